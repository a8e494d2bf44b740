-- renew: extend a live claim's lease.
-- ARGV[1] idx, ARGV[2] fence, ARGV[3] lease ms.
-- Returns the new expiry (ms) or 0 if the claim is no longer held.
if redis.call('EXISTS', J) == 0 then return 0 end
local i = ARGV[1]
local v = redis.call('HMGET', J, 's:' .. i, 'f:' .. i)
if v[1] ~= 'running' or v[2] ~= ARGV[2] then return 0 end
local le = NOW + tonumber(ARGV[3])
redis.call('HSET', J, 'le:' .. i, le)
return le
