-- claim: take the attempt a task message names.
-- ARGV[1] idx, ARGV[2] attempt, ARGV[3] worker, ARGV[4] lease ms.
-- Checks: the task is `ready` at exactly this attempt.
-- Returns {'claimed', fence, run spec (x), max attempts, name, lease expiry,
--          dep name, dep result, ...}
--      or {'busy'} (a live claim holds it), {'stale'} (attempt over),
--      or {'missing'} (no such job or task).
-- One HMGET reads everything, one HSET writes everything (hot path).
local i = ARGV[1]
local d = redis.call('HMGET', J, 's:' .. i, 'a:' .. i, 'x:' .. i, 'ma:' .. i, 'nm:' .. i,
  'af:' .. i, 'st', 'fence', 'v')
if not d[1] then return {'missing'} end
if d[2] ~= ARGV[2] then return {'stale'} end
if d[1] == 'running' then return {'busy'} end
if d[1] ~= 'ready' then return {'stale'} end
local x = d[3]
if not x then
  -- A job recorded before run specs were packed: its fields one by one.
  local o = redis.call('HMGET', J, 'bb:' .. i, 'bc:' .. i, 'to:' .. i, 'h:' .. i, 'p:' .. i)
  x = o[1] .. ',' .. o[2] .. ',' .. o[3] .. ',' .. #o[4] .. ',' .. o[4] .. o[5]
end
-- Above the job's last fence, and above the claim's moment (see
-- FENCE_FLOOR in common.lua): a claim whose record a crash or failover
-- lost is never handed out again under the same number.
local fence = math.max(tonumber(d[8]) + 1, FENCE_FLOOR + NOW * 1000)
local le = NOW + tonumber(ARGV[4])
local fence_s, le_s = string.format('%d', fence), string.format('%d', le)
hist(d[5], 'ready', 'running', 'claimed, attempt ' .. ARGV[2], ARGV[3])
local st = d[7]
if st == 'pending' then
  st = 'running'
  hist(nil, 'pending', 'running', 'first task claimed', ARGV[3])
end
redis.call('HSET', J, 's:' .. i, 'running', 'w:' .. i, ARGV[3], 'f:' .. i, fence_s,
  'le:' .. i, le_s, 'fence', fence_s, 'st', st, 'v', tonumber(d[9]) + 1, 'up', NOW)
local out = {'claimed', fence_s, x, d[4], d[5], le_s}
local deps = split_idx(d[6])
if #deps > 0 then
  local fields = {}
  for _, dep in ipairs(deps) do
    fields[#fields + 1] = 'nm:' .. dep
    fields[#fields + 1] = 'r:' .. dep
  end
  for s = 1, #fields, CHUNK do
    local r = redis.call('HMGET', J, unpack(fields, s, math.min(s + CHUNK - 1, #fields)))
    for k = 1, #r, 2 do
      out[#out + 1] = r[k]; out[#out + 1] = r[k + 1] or 'null'
    end
  end
end
return out
