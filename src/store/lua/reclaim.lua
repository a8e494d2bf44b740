-- reclaim: the lease index says a claim may have lapsed.
-- ARGV[1] idx, ARGV[2] attempt of the indexed claim, ARGV[3] by.
-- Checks the task's own lease (the index is only a hint):
-- - still running under a live lease: {'alive', lease expiry};
-- - running with a lapsed lease: orphaned; the next attempt becomes ready
--   ({'requeued', name, queue, attempt}) or, attempts used up, the task
--   fails ({'failed'});
-- - already re-queued by an earlier sweep that crashed before publishing,
--   or handed back by a worker that could not re-publish it:
--   {'requeued', ...} again;
-- - succeeded: {'done', ready dependents...} so follow-ups a crashed worker
--   never published are published now;
-- - anything else: {'gone'}.
if redis.call('EXISTS', J) == 0 then return {'gone'} end
local i, by = ARGV[1], ARGV[3]
local attempt = tonumber(ARGV[2])
local v = redis.call('HMGET', J, 's:' .. i, 'a:' .. i, 'le:' .. i, 'w:' .. i, 'ma:' .. i, 'nm:' .. i, 'q:' .. i)
local s, a = v[1], tonumber(v[2])
if not s then return {'gone'} end
if s == 'running' and a == attempt then
  local le = tonumber(v[3] or '0')
  if le > NOW then return {'alive', string.format('%d', le)} end
  local unusable = unusable_job()
  if unusable then return unusable end
  local reason = 'lease expired (worker ' .. (v[4] or '?') .. ')'
  if a < tonumber(v[5]) then
    redis.call('HSET', J, 's:' .. i, 'ready', 'a:' .. i, a + 1, 'e:' .. i, reason)
    redis.call('HDEL', J, 'le:' .. i)
    hist(v[6], 'running', 'ready', reason .. '; attempt ' .. (a + 1) .. ' queued', by)
    bump()
    return {'requeued', v[6], v[7], tostring(a + 1)}
  end
  fail_task(i, 'running', reason .. '; attempts used up (' .. a .. ' of ' .. v[5] .. ')', by)
  bump()
  settle_job(by)
  return {'failed'}
end
-- Ready at the next attempt (an earlier sweep re-queued it) or at this one
-- (its worker handed it back and may not have re-published it): offer it
-- again; a duplicate message is harmless.
if s == 'ready' and (a == attempt + 1 or a == attempt) then
  return {'requeued', v[6], v[7], tostring(a)}
end
if s == 'succeeded' and a == attempt then return ready_dependents(i, {'done'}) end
return {'gone'}
