-- poison: a task message was delivered too often without ever being
-- claimed to completion; fail the task with the reason.
-- ARGV[1] idx, ARGV[2] attempt, ARGV[3] reason, ARGV[4] by.
-- Checks: the task is still `ready` at this attempt (else someone made
-- progress with it and the message is merely a stale duplicate).
-- Returns {'failed', job state} or {'ignored'}.
if redis.call('EXISTS', J) == 0 then return {'ignored'} end
local i = ARGV[1]
local v = redis.call('HMGET', J, 's:' .. i, 'a:' .. i)
if v[1] ~= 'ready' or v[2] ~= ARGV[2] then return {'ignored'} end
fail_task(i, 'ready', ARGV[3], ARGV[4])
bump()
return {'failed', settle_job(ARGV[4])}
