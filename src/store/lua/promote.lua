-- promote: a scheduled retry is due; make the task ready again.
-- ARGV[1] idx, ARGV[2] attempt (the one to start), ARGV[3] by.
-- Idempotent: a task already ready at this attempt is offered again.
-- Returns {'ready', name, queue}, {'later', due ms}, {'pending'} (the task
-- is still at the attempt before, unfinished: the entry may be a retry
-- whose outcome is on its way, scheduled before it is applied, or a
-- refused outcome's; the caller keeps it and looks again later), or
-- {'gone'}.
if redis.call('EXISTS', J) == 0 then return {'gone'} end
local i = ARGV[1]
local v = redis.call('HMGET', J, 's:' .. i, 'a:' .. i, 'due:' .. i, 'nm:' .. i, 'q:' .. i)
if tonumber(v[2]) and tonumber(v[2]) + 1 == tonumber(ARGV[2])
    and v[1] ~= 'succeeded' and v[1] ~= 'failed' and v[1] ~= 'cancelled' then
  return {'pending'}
end
if v[2] ~= ARGV[2] then return {'gone'} end
if v[1] == 'ready' then return {'ready', v[4], v[5]} end
if v[1] ~= 'retrying' then return {'gone'} end
if tonumber(v[3]) > NOW then return {'later', v[3]} end
-- The version first: on a record whose version is no integer it fails
-- the call before anything is written.
bump()
redis.call('HSET', J, 's:' .. i, 'ready')
redis.call('HDEL', J, 'due:' .. i)
hist(v[4], 'retrying', 'ready', 'retry due, attempt ' .. ARGV[2], ARGV[3])
return {'ready', v[4], v[5]}
