-- complete: apply how a claimed attempt ended, exactly once per claim.
-- ARGV[1] idx, ARGV[2] attempt, ARGV[3] fence, ARGV[4] kind (ok|retry|fail),
-- ARGV[5] result JSON or error text, ARGV[6] retry delay ms, ARGV[7] worker.
-- Checks: the task is `running` under this very claim (attempt and fence),
-- else the result is a duplicate (this fence was applied already: answer
-- as before, with the ready set again) or stale (rejected).
-- Returns {'applied'|'duplicate', task state, job state, ready...}
--      or {'stale'} or {'missing'}.
if redis.call('EXISTS', J) == 0 then return {'missing'} end
local i, fence, by = ARGV[1], ARGV[3], ARGV[7]
local v = redis.call('HMGET', J, 's:' .. i, 'a:' .. i, 'f:' .. i, 'lf:' .. i, 'nm:' .. i, 'ma:' .. i)
if not v[1] then return {'missing'} end
if v[4] == fence then
  return ready_dependents(i, {'duplicate', v[1], hget('st')})
end
if v[1] ~= 'running' or v[2] ~= ARGV[2] or v[3] ~= fence then return {'stale'} end
local name, kind = v[5], ARGV[4]
local out = {'applied', '', ''}
redis.call('HSET', J, 'lf:' .. i, fence)
redis.call('HDEL', J, 'le:' .. i)
if kind == 'ok' then
  redis.call('HSET', J, 's:' .. i, 'succeeded', 'r:' .. i, ARGV[5])
  redis.call('HDEL', J, 'e:' .. i)
  hist(name, 'running', 'succeeded', 'succeeded on attempt ' .. ARGV[2], by)
  redis.call('HINCRBY', J, 'open', -1)
  release_dependents(i, by, out)
  out[2] = 'succeeded'
elseif kind == 'retry' and tonumber(ARGV[2]) < tonumber(v[6]) then
  local due = NOW + tonumber(ARGV[6])
  local next_attempt = tonumber(ARGV[2]) + 1
  redis.call('HSET', J, 's:' .. i, 'retrying', 'a:' .. i, next_attempt, 'e:' .. i, ARGV[5], 'due:' .. i, due)
  hist(name, 'running', 'retrying', 'attempt ' .. ARGV[2] .. ' failed: ' .. ARGV[5] ..
    '; attempt ' .. next_attempt .. ' due in ' .. ARGV[6] .. ' ms', by)
  out[2] = 'retrying'
else
  local reason = ARGV[5]
  if kind == 'retry' then
    reason = reason .. ' (attempts used up: ' .. ARGV[2] .. ' of ' .. v[6] .. ')'
  end
  fail_task(i, 'running', reason, by)
  out[2] = 'failed'
end
bump()
out[3] = settle_job(by)
return out
