-- claim: take the attempts task messages name: one or more tasks of the
-- job in one call (a worker's claims that arrive together are sent as one
-- round: see `RedisStore::claim`).
-- ARGV[1] worker, ARGV[2] lease ms, ARGV[3] most bytes of dependency
-- results to hand out per task, then (idx, attempt, token) triples, the
-- token unique to the request (kept as `ct:<i>` with its claim).
-- Checks, for each triple in turn: the task is `ready` at exactly this
-- attempt (and was not claimed by an earlier triple of the same call), or
-- `running` under a claim this request's token made (sent again).
-- Returns one reply per triple, in order: {'claimed', fence, run spec (x),
--          max attempts, name, lease expiry, '', dep name, dep result, ...}
--      or, when the dependency results together exceed ARGV[3], the claim
--          made but {'claimed', fence, x, max attempts, name, lease
--          expiry, their total bytes, how many} (the worker fails it);
--      or {'busy'} (a live claim holds it), {'stale'} (attempt over),
--      {'missing'} (no such job or task), or {'unusable', why} (a task
--      whose run spec or max attempts the store could not read back).
-- One HMGET per task reads its fields (the first also the job's), and one
-- HSET at the end writes every claim (hot path: a call costs a few
-- microseconds before it does anything, each redis.call about one more).
local by, lease, max_in = ARGV[1], tonumber(ARGV[2]), tonumber(ARGV[3])
local le_s = string.format('%d', NOW + lease)
local st, fence, version
local writes, replies, taken = {}, {}, {}
-- The claimed reply for task i (d its HMGET below) under fence_s until
-- le_s, its dependencies' results read now.
local function claimed_reply(i, d, fence_s, until_s)
  local x = d[3]
  if not x then
    -- A job recorded before run specs were packed: its fields one by one.
    local o = redis.call('HMGET', J, 'bb:' .. i, 'bc:' .. i, 'to:' .. i, 'h:' .. i, 'p:' .. i)
    x = o[1] .. ',' .. o[2] .. ',' .. o[3] .. ',' .. #o[4] .. ',' .. o[4] .. o[5]
  end
  local reply = {'claimed', fence_s, x, d[4], d[5], until_s, ''}
  local deps = split_idx(d[6])
  if #deps > 0 then
    local fields = {}
    for _, dep in ipairs(deps) do
      fields[#fields + 1] = 'nm:' .. dep
      fields[#fields + 1] = 'r:' .. dep
    end
    -- Results are read a few at a time and counted as they come: past
    -- the limit the rest are only measured (HSTRLEN), so a join over
    -- large results never holds more than the limit and one read.
    local total, over = 0, false
    for s = 1, #fields, RESULT_CHUNK do
      local e = math.min(s + RESULT_CHUNK - 1, #fields)
      if over then
        for m = s + 1, e, 2 do
          local l = redis.call('HSTRLEN', J, fields[m])
          total = total + (l > 0 and l or 4)
        end
      else
        local r = redis.call('HMGET', J, unpack(fields, s, e))
        for m = 1, #r, 2 do
          local v = r[m + 1] or 'null'
          total = total + #v
          reply[#reply + 1] = r[m]; reply[#reply + 1] = v
        end
        over = total > max_in
      end
    end
    if over then
      reply = {'claimed', fence_s, x, d[4], d[5], until_s, string.format('%d', total),
        string.format('%d', #deps)}
    end
  end
  return reply
end
-- Whether run spec `x` reads as the store reads it (`RunSpec::decode`:
-- four numbers, then the handler of that length and the params).
local function usable_spec(x)
  local head, len = string.match(x, '^(%d+,%d+,%d+,(%d+),)')
  return head ~= nil and #x - #head >= tonumber(len)
end
for k = 4, #ARGV - 2, 3 do
  local i, attempt, token = ARGV[k], ARGV[k + 1], ARGV[k + 2]
  local d
  if st == nil then
    d = redis.call('HMGET', J, 's:' .. i, 'a:' .. i, 'x:' .. i, 'ma:' .. i, 'nm:' .. i,
      'af:' .. i, 'st', 'fence', 'v')
    st, fence, version = d[7], tonumber(d[8]), tonumber(d[9])
  else
    d = redis.call('HMGET', J, 's:' .. i, 'a:' .. i, 'x:' .. i, 'ma:' .. i, 'nm:' .. i,
      'af:' .. i)
  end
  local reply
  if not d[1] then
    reply = {'missing'}
  elseif d[2] ~= attempt then
    reply = {'stale'}
  elseif taken[i] then
    reply = {'busy'}
  elseif d[1] == 'running' then
    -- This very request, sent again because the connection dropped before
    -- its reply came (its token is the claim's): answered as it was, not
    -- `busy`, which would leave its own claim to lapse, an attempt spent
    -- on nothing.
    local held = redis.call('HMGET', J, 'ct:' .. i, 'f:' .. i, 'le:' .. i)
    if held[1] == token and held[2] and held[3] then
      reply = claimed_reply(i, d, held[2], held[3])
    else
      reply = {'busy'}
    end
  elseif d[1] ~= 'ready' then
    reply = {'stale'}
  elseif not is_int(d[4]) or (d[3] and not usable_spec(d[3])) then
    -- Refused, and not made: a claim whose reply the store cannot read
    -- would be made and run nowhere, its message dead-lettered, until its
    -- lease lapsed. This claim's alone: the call's other claims (tasks
    -- of the same job in the same round) are made as if it were not there.
    reply = {'unusable', 'job record unusable: task ' .. i ..
      ' has no max attempts or run spec the store can read'}
  else
    taken[i] = true
    -- Above the job's last fence, and above the claim's moment (see
    -- FENCE_FLOOR in common.lua): a claim whose record a crash or failover
    -- lost is never handed out again under the same number.
    fence = math.max(fence + 1, FENCE_FLOOR + NOW * 1000)
    local fence_s = string.format('%d', fence)
    hist(d[5], 'ready', 'running', 'claimed, attempt ' .. attempt, by)
    if st == 'pending' then
      st = 'running'
      hist(nil, 'pending', 'running', 'first task claimed', by)
    end
    version = version + 1
    local n = #writes
    writes[n + 1] = 's:' .. i; writes[n + 2] = 'running'
    writes[n + 3] = 'w:' .. i; writes[n + 4] = by
    writes[n + 5] = 'f:' .. i; writes[n + 6] = fence_s
    writes[n + 7] = 'le:' .. i; writes[n + 8] = le_s
    writes[n + 9] = 'ct:' .. i; writes[n + 10] = token
    reply = claimed_reply(i, d, fence_s, le_s)
  end
  replies[#replies + 1] = reply
end
if #writes > 0 then
  local n = #writes
  writes[n + 1] = 'fence'; writes[n + 2] = string.format('%d', fence)
  writes[n + 3] = 'st'; writes[n + 4] = st
  writes[n + 5] = 'v'; writes[n + 6] = string.format('%d', version)
  writes[n + 7] = 'up'; writes[n + 8] = NOW_JSON
  for s = 1, #writes, CHUNK do
    redis.call('HSET', J, unpack(writes, s, math.min(s + CHUNK - 1, #writes)))
  end
end
return replies
