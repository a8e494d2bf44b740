-- forget_due: drop entries of a schedule index that are still due.
-- keys[1] (J in the prelude; this call touches no job): the index, a
-- sorted set. ARGV[1] now (ms, by the caller's clock, as the entries'
-- scores are), ARGV[2..] entries.
-- Checks each entry's score: one that moved past now since the caller read
-- it as due stays (a claim of that attempt, taken meanwhile, pushed it to
-- its own lease expiry: dropping it would leave a running claim that no
-- sweep finds if its worker dies).
-- Returns how many were dropped.
local now, n = tonumber(ARGV[1]), 0
for k = 2, LAST do
  local score = redis.call('ZSCORE', J, ARGV[k])
  if score and tonumber(score) <= now then
    redis.call('ZREM', J, ARGV[k])
    n = n + 1
  end
end
return n
