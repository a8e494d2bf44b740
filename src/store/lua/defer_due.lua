-- defer_due: move entries of a schedule index that are still due to a
-- later time.
-- keys[1] (J in the prelude; this call touches no job): the index, a
-- sorted set. ARGV[1] now (ms, by the caller's clock, as the entries'
-- scores are: the moment the caller read them as due), ARGV[2] the time
-- to move them to, ARGV[3..] entries.
-- Checks each entry's score: one that moved past now since the caller read
-- it keeps its score (a retry's outcome, applied meanwhile, scheduled it
-- anew: moving it would start the retry late).
-- Returns how many were moved.
local now, at, n = tonumber(ARGV[1]), ARGV[2], 0
for k = 3, LAST do
  local score = redis.call('ZSCORE', J, ARGV[k])
  if score and tonumber(score) <= now then
    redis.call('ZADD', J, 'XX', at, ARGV[k])
    n = n + 1
  end
end
return n
