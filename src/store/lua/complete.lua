-- complete: apply how a claimed attempt ended, exactly once per claim.
-- ARGV[1] idx, ARGV[2] attempt, ARGV[3] fence, ARGV[4] kind (ok|retry|fail),
-- ARGV[5] result JSON or error text, ARGV[6] retry delay ms, ARGV[7] worker.
-- Checks: the task is `running` under this very claim (attempt and fence),
-- else the result is a duplicate (this fence was applied already: answer
-- as before, with the ready set again) or stale (rejected).
-- Returns {'applied'|'duplicate', task state, job state, ready...}
--      or {'stale'} or {'missing'}.
-- Success and retry (the hot paths) read with one HMGET and write with one
-- HSET; failure goes through the shared helpers.
local i, fence, by = ARGV[1], ARGV[3], ARGV[7]
local v = redis.call('HMGET', J, 's:' .. i, 'a:' .. i, 'f:' .. i, 'lf:' .. i, 'nm:' .. i,
  'ma:' .. i, 'dp:' .. i, 'open', 'st', 'nfail', 'ncanc', 'ret', 'v')
if not v[1] then return {'missing'} end
if v[4] == fence then
  return ready_dependents(i, {'duplicate', v[1], v[9]})
end
if v[1] ~= 'running' or v[2] ~= ARGV[2] or v[3] ~= fence then return {'stale'} end
local name, kind = v[5], ARGV[4]
-- Every number this call needs, read before the first write: a record
-- whose counters are not numbers (corrupt, or another version's) fails
-- the call whole, not halfway through its writes.
if not (is_int(v[6]) and is_int(v[8]) and is_int(v[10]) and is_int(v[11])
    and is_int(v[12]) and is_int(v[13])) then
  return redis.error_reply('ERR job record unusable: a counter of task ' .. i ..
    ' or of its job is not an integer')
end
local out = {'applied', '', ''}
redis.call('HDEL', J, 'le:' .. i, 'e:' .. i, 'ct:' .. i)
if kind == 'ok' then
  hist(name, 'running', 'succeeded', 'succeeded on attempt ' .. ARGV[2], by)
  local open = tonumber(v[8]) - 1
  local fields = {'lf:' .. i, fence, 's:' .. i, 'succeeded', 'r:' .. i, ARGV[5],
    'open', open, 'v', tonumber(v[13]) + 1, 'up', NOW}
  if v[7] then
    release_dependents(i, by, out, v[7])
  end
  local st = v[9]
  if open == 0 then
    local to = 'succeeded'
    if tonumber(v[10]) > 0 then
      to = 'failed'
    elseif tonumber(v[11]) > 0 then
      to = 'cancelled'
    end
    hist(nil, st, to, 'all tasks finished', by)
    fields[#fields + 1] = 'st'; fields[#fields + 1] = to
    fields[#fields + 1] = 'fin_us'; fields[#fields + 1] = now_us()
    st = to
  end
  redis.call('HSET', J, unpack(fields))
  if open == 0 then
    local ret = tonumber(v[12])
    redis.call('PEXPIRE', J, ret)
    redis.call('PEXPIRE', H, ret)
  end
  out[2] = 'succeeded'
  out[3] = st
  return out
end
if kind == 'retry' and tonumber(ARGV[2]) < tonumber(v[6]) then
  local due = NOW + tonumber(ARGV[6])
  local next_attempt = tonumber(ARGV[2]) + 1
  redis.call('HSET', J, 'lf:' .. i, fence, 's:' .. i, 'retrying', 'a:' .. i, next_attempt,
    'e:' .. i, ARGV[5], 'due:' .. i, due, 'v', tonumber(v[13]) + 1, 'up', NOW)
  hist(name, 'running', 'retrying', 'attempt ' .. ARGV[2] .. ' failed: ' .. ARGV[5] ..
    '; attempt ' .. next_attempt .. ' due in ' .. ARGV[6] .. ' ms', by)
  out[2] = 'retrying'
  out[3] = v[9]
  return out
end
redis.call('HSET', J, 'lf:' .. i, fence)
local reason = ARGV[5]
if kind == 'retry' then
  reason = reason .. ' (attempts used up: ' .. ARGV[2] .. ' of ' .. v[6] .. ')'
end
fail_task(i, 'running', reason, by)
bump()
out[2] = 'failed'
out[3] = settle_job(by)
return out
