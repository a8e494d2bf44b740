-- claim: take the attempt a task message names.
-- ARGV[1] idx, ARGV[2] attempt, ARGV[3] worker, ARGV[4] lease ms.
-- Checks: the task is `ready` at exactly this attempt.
-- Returns {'claimed', fence, handler, params, max attempts, timeout ms,
--          name, lease expiry, backoff base, backoff cap, dep name, dep result, ...}
--      or {'busy'} (a live claim holds it), {'stale'} (attempt over),
--      or {'missing'} (no such job or task).
if redis.call('EXISTS', J) == 0 then return {'missing'} end
local i = ARGV[1]
local v = redis.call('HMGET', J, 's:' .. i, 'a:' .. i)
if not v[1] then return {'missing'} end
if v[2] ~= ARGV[2] then return {'stale'} end
if v[1] == 'running' then return {'busy'} end
if v[1] ~= 'ready' then return {'stale'} end
local fence = redis.call('HINCRBY', J, 'fence', 1)
local le = NOW + tonumber(ARGV[4])
redis.call('HSET', J, 's:' .. i, 'running', 'w:' .. i, ARGV[3], 'f:' .. i, fence, 'le:' .. i, le)
local d = redis.call('HMGET', J, 'h:' .. i, 'p:' .. i, 'ma:' .. i, 'to:' .. i, 'nm:' .. i,
  'bb:' .. i, 'bc:' .. i, 'af:' .. i, 'st')
hist(d[5], 'ready', 'running', 'claimed, attempt ' .. ARGV[2], ARGV[3])
if d[9] == 'pending' then
  redis.call('HSET', J, 'st', 'running')
  hist(nil, 'pending', 'running', 'first task claimed', ARGV[3])
end
bump()
local out = {'claimed', string.format('%d', fence), d[1], d[2], d[3], d[4], d[5], string.format('%d', le), d[6], d[7]}
for _, dep in ipairs(split_idx(d[8])) do
  local r = redis.call('HMGET', J, 'nm:' .. dep, 'r:' .. dep)
  out[#out + 1] = r[1]; out[#out + 1] = r[2] or 'null'
end
return out
