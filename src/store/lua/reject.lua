-- reject: record a refused submission unless the id exists.
-- ARGV[1] id, ARGV[2] requestor, ARGV[3] error, ARGV[4] retention ms, ARGV[5] by.
-- Returns 1 if recorded, 0 if the id existed.
if redis.call('EXISTS', J) == 1 then return 0 end
redis.call('HSET', J, 'id', ARGV[1], 'st', 'rejected', 'req', ARGV[2], 'err', ARGV[3],
  'lab', '{}', 'n', 0, 'open', 0, 'cr', NOW, 'up', NOW, 'fin_us', now_us(), 'v', 1)
hist(nil, nil, 'rejected', ARGV[3], ARGV[5])
-- The history list exists only once pushed: its expiry after that. (Set
-- before, until the twenty-eighth session, it did nothing, and every
-- rejected submission's history stayed in Redis for good.)
flush_hist()
redis.call('PEXPIRE', J, tonumber(ARGV[4]))
redis.call('PEXPIRE', H, tonumber(ARGV[4]))
return 1
