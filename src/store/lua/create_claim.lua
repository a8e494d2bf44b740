-- create_claim: create, then claim the root task a worker taking the
-- submission runs in place, in one call (one script dispatch, one history
-- write, fields just written read back from memory).
-- ARGV as create's, followed by the claim's six (idx, attempt, token,
-- worker, lease ms, most bytes of dependency results) and the queue the worker
-- chose the root for. The claim runs whether the job was new or existed
-- (a job recorded before whose root is still ready is claimed like any
-- message of it), but not when the recorded task at that index is ready
-- on another queue (an id used again for other tasks): the worker chose
-- the root by the submission's queue, and the recorded task belongs to
-- the workers of its own; the claim then answers {'stale'}.
-- Returns {create's reply, claim's reply}.
local n = #ARGV
local idx, queue = ARGV[n - 6], ARGV[n]
local claim_args = {ARGV[n - 3], ARGV[n - 2], ARGV[n - 1], idx, ARGV[n - 5], ARGV[n - 4]}
LAST = n - 7
local created = body_create()
if created[1] == 'exists' then
  local v = redis.call('HMGET', J, 's:' .. idx, 'q:' .. idx)
  if v[1] == 'ready' and v[2] ~= queue then
    return {created, {'stale'}}
  end
end
ARGV = claim_args
local claimed = body_claim()
return {created, claimed[1]}
