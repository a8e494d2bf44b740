-- create: record a new job unless its id exists.
-- ARGV[1] requestor (for history), ARGV[2] by, ARGV[3..] field/value pairs
-- of the job hash, precomputed by the planner (including `fence`, the
-- store epoch's base).
-- Returns {'created'} or {'exists', job state, ready tasks...} where ready
-- tasks are {idx, name, queue, attempt}* for an idempotent re-publish.
if redis.call('EXISTS', J) == 1 then
  local out = {'exists', hget('st')}
  local n = tonumber(hget('n') or '0')
  for i = 0, n - 1 do
    local v = redis.call('HMGET', J, 's:' .. i, 'nm:' .. i, 'q:' .. i, 'a:' .. i)
    if v[1] == 'ready' then
      out[#out + 1] = tostring(i); out[#out + 1] = v[2]; out[#out + 1] = v[3]; out[#out + 1] = v[4]
    end
  end
  return out
end
-- HSET in chunks: Lua's unpack has a small stack limit.
local chunk = 4000
for s = 3, LAST, chunk do
  local e = math.min(s + chunk - 1, LAST)
  redis.call('HSET', J, unpack(ARGV, s, e))
end
redis.call('HSET', J, 'cr', NOW, 'up', NOW, 'v', 1, 'nfail', 0, 'ncanc', 0)
hist(nil, nil, 'pending', 'submitted by ' .. ARGV[1], ARGV[2])
return {'created'}
