-- forget_due: drop entries of a schedule index that are still as the
-- caller read them when due.
-- keys[1] (J in the prelude; this call touches no job): the index, a
-- sorted set. ARGV[1] the time of that read (ms, by the caller's clock, as
-- the entries' scores are), ARGV[2..] entries.
-- Checks each entry's score: one moved past the read since stays, even if
-- due again by now (a lease entry: a claim of that attempt, taken
-- meanwhile, pushed it to its own lease expiry, and dropping it would leave
-- a running claim that no sweep finds if its worker dies; either index:
-- the audit raised it after the store lost a claim or a promotion, for the
-- task to be offered or promoted again).
-- Returns how many were dropped.
local read_at, n = tonumber(ARGV[1]), 0
for k = 2, LAST do
  local score = redis.call('ZSCORE', J, ARGV[k])
  if score and tonumber(score) <= read_at then
    redis.call('ZREM', J, ARGV[k])
    n = n + 1
  end
end
return n
