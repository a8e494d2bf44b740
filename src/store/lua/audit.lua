-- audit: the schedule entries this job's record calls for (after Redis
-- restarted or failed over: it may have lost its latest writes, and with
-- them a claim and its lease entry while the claim's message was acked).
-- No arguments. Writes nothing: the indexes live in other slots, so the
-- caller adds what they lack, or raises an entry to the wanted time (ZADD
-- GT): an entry that stays as it was may be one a sweep read as due before
-- the loss, and its forget (of entries still as it read them) would then
-- drop it.
-- Returns {} for a job that is gone or finished, else {index, idx,
-- attempt, due ms}* with index 'l' (`<p>:leases`) or 'r' (`<p>:retries`):
-- - running: its claim's lease entry at the lease's expiry, or now if
--   that is past (an entry at a lapsed expiry may be one a sweep read
--   before the loss, when the lease had lapsed, and reclaimed on the lost
--   data: its forget of entries still as read would drop it, leaving the
--   task running with nothing to find it);
-- - ready: a lease entry due now (reclaim offers the attempt again);
-- - retrying: its retry entry at its due time, or now if that is past.
-- "Now" is a millisecond on: past the time of any sweep's read before
-- this call, even one in the same millisecond.
-- Mirrors `JobRecord::schedule_entries` in machine.rs.
local st = hget('st')
if not st or st == 'succeeded' or st == 'failed' or st == 'cancelled' or st == 'rejected' then
  return {}
end
local n = tonumber(hget('n') or '0') or 0
local out = {}
local soon = string.format('%d', NOW + 1)
local function want(index, i, a, due)
  out[#out + 1] = index; out[#out + 1] = tostring(i); out[#out + 1] = a; out[#out + 1] = due
end
for s = 0, n - 1, RELEASE_CHUNK do
  local e = math.min(s + RELEASE_CHUNK - 1, n - 1)
  local fields = {}
  for i = s, e do
    fields[#fields + 1] = 's:' .. i
    fields[#fields + 1] = 'a:' .. i
    fields[#fields + 1] = 'le:' .. i
    fields[#fields + 1] = 'due:' .. i
  end
  local v = redis.call('HMGET', J, unpack(fields))
  for i = s, e do
    local b = (i - s) * 4
    local state, a = v[b + 1], v[b + 2]
    if not a then
      -- No attempt to name: nothing an entry could offer (a corrupt
      -- record, left to the claim that meets it).
    elseif state == 'running' then
      local le = tonumber(v[b + 3])
      want('l', i, a, (le and le > NOW) and v[b + 3] or soon)
    elseif state == 'ready' then
      want('l', i, a, soon)
    elseif state == 'retrying' then
      local due = tonumber(v[b + 4])
      want('r', i, a, (due and due > NOW) and v[b + 4] or soon)
    end
  end
end
return out
