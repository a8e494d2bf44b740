-- release: a worker hands back a claim it will not finish (shutdown).
-- ARGV[1] idx, ARGV[2] fence, ARGV[3] worker.
-- Checks: the claim is live (running under this fence). The same attempt
-- becomes ready again: an attempt cut short by shutdown does not count.
-- Returns {'released', name, queue, attempt} or {'not_held'}.
if redis.call('EXISTS', J) == 0 then return {'not_held'} end
local i = ARGV[1]
local v = redis.call('HMGET', J, 's:' .. i, 'f:' .. i, 'nm:' .. i, 'q:' .. i, 'a:' .. i)
if v[1] ~= 'running' or v[2] ~= ARGV[2] then return {'not_held'} end
-- The version first: on a record whose version is no integer it fails
-- the call before anything is written.
bump()
redis.call('HSET', J, 's:' .. i, 'ready')
redis.call('HDEL', J, 'le:' .. i)
hist(v[3], 'running', 'ready', 'handed back by worker at shutdown', ARGV[3])
return {'released', v[3], v[4], v[5]}
