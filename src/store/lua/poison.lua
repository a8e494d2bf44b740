-- poison: a task message was delivered too often without ever being
-- claimed to completion; fail the task with the reason.
-- ARGV[1] idx, ARGV[2] attempt, ARGV[3] reason, ARGV[4] by.
-- Checks: the task is still `ready` at this attempt (else someone made
-- progress with it and the message is merely a stale duplicate).
-- Returns {'failed', job state} or {'ignored'}; {'failed', ...} too when
-- the task already failed at this attempt with this reason: this call,
-- sent again after its reply was lost with its connection.
if redis.call('EXISTS', J) == 0 then return {'ignored'} end
local i = ARGV[1]
local v = redis.call('HMGET', J, 's:' .. i, 'a:' .. i, 'e:' .. i, 'st')
if v[1] == 'failed' and v[2] == ARGV[2] and v[3] == ARGV[3] then
  return {'failed', v[4]}
end
if v[1] ~= 'ready' or v[2] ~= ARGV[2] then return {'ignored'} end
local unusable = unusable_job()
if unusable then return unusable end
fail_task(i, 'ready', ARGV[3], ARGV[4])
bump()
return {'failed', settle_job(ARGV[4])}
