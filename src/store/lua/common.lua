-- Shared prelude of the Conveyor function library (every transition below
-- is one function of it; `store/redis/functions.rs` puts the library together).
-- keys[1]: the job hash; keys[2]: the job's history list. Both carry the
-- job's hash tag, so every call touches exactly one Redis Cluster slot.
--
-- Job hash fields: id, st (job state), v (version), req, lab (labels JSON),
-- cr/up (created/updated ms), fin_us (the microsecond the job reached its
-- final state, for exact latency), n (tasks), open (non-terminal tasks),
-- nfail, ncanc, fence (the last fence handed out: starts at the store's
-- epoch base, and a claim takes the larger of it + 1 and FENCE_FLOOR + its
-- moment, so fences never repeat across a Redis that lost its data or its
-- latest writes), ret (retention ms), err.
-- Per task i: nm name, q queue, x run spec (`<backoff base>,<backoff
-- cap>,<timeout ms>,<handler length>,<handler><params>`: only claims read
-- it, so it is one field; jobs recorded before it have h, p, bb, bc, to
-- instead), af deps (comma list), dp dependents (comma list), dl deps
-- left, s state, a attempt, ma max attempts, r result, e error, w worker,
-- f fence of the live claim, lf fence of the last applied result, le lease
-- expiry, due next retry (all as `<field>:<i>`).
--
-- The library is loaded once, so the helpers below are made once; the
-- state of one call lives in these locals, set by `begin` before every
-- call (Redis runs one call at a time).
local ARGV, LAST, J, H, t, NOW, NOW_JSON, HIST, JSON_OF

-- 2^51: above every epoch's fence base (`epoch << 20`, epoch < 2^31). A
-- claim's fence is at least this plus the claim's moment in ms * 1000, so
-- fences handed out after Redis lost recent writes (a crash under
-- `appendfsync everysec`, an unplanned failover) exceed every fence handed
-- out before, lost or not; below 2^53, so exact as a Lua number, until
-- the year 2184. Mirrored by `machine.rs` (`fence_floor`).
local FENCE_FLOOR = 2251799813685248

local function begin(keys, args)
  ARGV = args
  -- The last argument of the call's own (create_claim appends more).
  LAST = #args
  J, H = keys[1], keys[2]
  t = redis.call('TIME')
  NOW = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
  -- Formatted once: Lua formats numbers with sprintf (~1 us each).
  NOW_JSON = string.format('%d', NOW)
  HIST = {}
  JSON_OF = {}
end

-- The moment of the call in us, as text (no number formatting).
local function now_us()
  return t[1] .. string.rep('0', 6 - #t[2]) .. t[2]
end

local function hget(f)
  return redis.call('HGET', J, f)
end

-- History entries are buffered and written with one RPUSH when the call
-- ends (`flush_hist`, called by the wrapper around every function body):
-- each redis.call from Lua costs about a microsecond of its own. Entries
-- are put together as text, each distinct string JSON-encoded once per
-- call (a 10,000-wide release repeats the same states, reason and worker
-- 10,000 times).
local function json_string(s)
  if not s then return 'null' end
  local j = JSON_OF[s]
  if not j then
    j = cjson.encode(s)
    JSON_OF[s] = j
  end
  return j
end

local function hist(task, from, to, reason, by)
  HIST[#HIST + 1] = '{"at":' .. NOW_JSON .. ',"task":' .. json_string(task) ..
    ',"from":' .. json_string(from) .. ',"to":' .. json_string(to) ..
    ',"reason":' .. json_string(reason) .. ',"by":' .. json_string(by) .. '}'
end

-- unpack() has a small stack limit: long lists go in chunks.
local CHUNK = 1000
-- Fields per read of dependency results (name and result: 64 tasks'),
-- which may each be `limits.max_result_bytes` long.
local RESULT_CHUNK = 128

-- Push the buffered history entries (after the body, and by a body that
-- must set the list's expiry: PEXPIRE on a list not yet there does nothing).
local function flush_hist()
  for s = 1, #HIST, CHUNK do
    redis.call('RPUSH', H, unpack(HIST, s, math.min(s + CHUNK - 1, #HIST)))
  end
  HIST = {}
end

local function bump()
  redis.call('HINCRBY', J, 'v', 1)
  redis.call('HSET', J, 'up', NOW)
end

local function split_idx(s)
  local out = {}
  if s and s ~= '' then
    for x in string.gmatch(s, '[^,]+') do out[#out + 1] = x end
  end
  return out
end

-- Dependents of task i that are ready: {idx, name, queue, attempt}*.
local function ready_dependents(i, out)
  for _, d in ipairs(split_idx(hget('dp:' .. i))) do
    local v = redis.call('HMGET', J, 's:' .. d, 'nm:' .. d, 'q:' .. d, 'a:' .. d)
    if v[1] == 'ready' then
      out[#out + 1] = d; out[#out + 1] = v[2]; out[#out + 1] = v[3]; out[#out + 1] = v[4]
    end
  end
  return out
end

-- Task i succeeded: count it down in every dependent; those with no
-- dependency left become ready (attempt 1) and are appended to `out`.
-- `dp` is the dependents field of task i when the caller has read it.
-- Dependents are read with one HMGET and written with one HSET per chunk
-- (a 10,000-wide fan-out releases in 20 pairs of calls, not 40,000 calls).
local RELEASE_CHUNK = 500

local function release_dependents(i, by, out, dp)
  local deps = split_idx(dp or hget('dp:' .. i))
  for s = 1, #deps, RELEASE_CHUNK do
    local e = math.min(s + RELEASE_CHUNK - 1, #deps)
    local fields = {}
    for k = s, e do
      local d = deps[k]
      fields[#fields + 1] = 'dl:' .. d
      fields[#fields + 1] = 's:' .. d
      fields[#fields + 1] = 'nm:' .. d
      fields[#fields + 1] = 'q:' .. d
    end
    local v = redis.call('HMGET', J, unpack(fields))
    local writes = {}
    for k = s, e do
      local d, b = deps[k], (k - s) * 4
      local left = tonumber(v[b + 1] or '0') - 1
      writes[#writes + 1] = 'dl:' .. d
      -- A literal where it can be: a number would be formatted by sprintf.
      writes[#writes + 1] = (left == 0) and '0' or tostring(left)
      if left == 0 and v[b + 2] == 'waiting' then
        writes[#writes + 1] = 's:' .. d
        writes[#writes + 1] = 'ready'
        writes[#writes + 1] = 'a:' .. d
        writes[#writes + 1] = '1'
        hist(v[b + 3], 'waiting', 'ready', 'dependencies succeeded', by)
        out[#out + 1] = d; out[#out + 1] = v[b + 3]; out[#out + 1] = v[b + 4]; out[#out + 1] = '1'
      end
    end
    redis.call('HSET', J, unpack(writes))
  end
  return out
end

-- Fail every waiting task downstream of task i (breadth first).
local function fail_dependents(i, by)
  local name = hget('nm:' .. i)
  local queue = split_idx(hget('dp:' .. i))
  local head = 1
  while head <= #queue do
    local d = queue[head]
    head = head + 1
    if hget('s:' .. d) == 'waiting' then
      local reason = 'dependency failed: ' .. name
      redis.call('HSET', J, 's:' .. d, 'failed', 'e:' .. d, reason)
      hist(hget('nm:' .. d), 'waiting', 'failed', reason, by)
      redis.call('HINCRBY', J, 'open', -1)
      redis.call('HINCRBY', J, 'nfail', 1)
      for _, x in ipairs(split_idx(hget('dp:' .. d))) do queue[#queue + 1] = x end
    end
  end
end

-- Task i failed for good with `reason`.
local function fail_task(i, from, reason, by)
  redis.call('HSET', J, 's:' .. i, 'failed', 'e:' .. i, reason)
  redis.call('HDEL', J, 'le:' .. i, 'due:' .. i)
  hist(hget('nm:' .. i), from, 'failed', reason, by)
  redis.call('HINCRBY', J, 'open', -1)
  redis.call('HINCRBY', J, 'nfail', 1)
  fail_dependents(i, by)
end

-- True when `s` is an integer's text: what HINCRBY accepts and tonumber
-- reads exactly (HMGET answers `false` for a missing field).
local function is_int(s)
  return type(s) == 'string' and string.match(s, '^%-?%d+$') ~= nil
end

-- The job's counters that a failure's path writes or reads (`fail_task`,
-- `bump`, `settle_job`), checked before a call's first write: a record
-- whose counters are not integers (corrupt, or another version's) fails
-- the call whole, not halfway through its writes. Returns the error reply
-- to answer with, or nil.
local function unusable_job()
  local v = redis.call('HMGET', J, 'open', 'nfail', 'ncanc', 'ret', 'v')
  local names = {'open', 'nfail', 'ncanc', 'ret', 'v'}
  for k = 1, #names do
    if not is_int(v[k]) then
      return redis.error_reply('ERR job record unusable: its ' .. names[k] ..
        ' is not an integer')
    end
  end
  return nil
end

-- When no task is open, the job is terminal: record it and start the
-- retention clock on both keys. Returns the job state.
local function settle_job(by)
  local st = hget('st')
  if tonumber(hget('open')) > 0 then return st end
  local to = 'succeeded'
  if tonumber(hget('nfail')) > 0 then
    to = 'failed'
  elseif tonumber(hget('ncanc')) > 0 then
    to = 'cancelled'
  end
  redis.call('HSET', J, 'st', to, 'fin_us', now_us())
  hist(nil, st, to, 'all tasks finished', by)
  local ret = tonumber(hget('ret'))
  redis.call('PEXPIRE', J, ret)
  redis.call('PEXPIRE', H, ret)
  return to
end
