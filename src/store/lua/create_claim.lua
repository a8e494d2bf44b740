-- create_claim: create, then claim the root task a worker taking the
-- submission runs in place, in one call (one script dispatch, one history
-- write, fields just written read back from memory).
-- ARGV as create's, followed by the claim's five (idx, attempt, worker,
-- lease ms, most bytes of dependency results). The claim runs whether the job was new or existed (a job
-- recorded before whose root is still ready is claimed like any message
-- of it). Returns {create's reply, claim's reply}.
local n = #ARGV
local claim_args = {ARGV[n - 2], ARGV[n - 1], ARGV[n], ARGV[n - 4], ARGV[n - 3]}
LAST = n - 5
local created = body_create()
ARGV = claim_args
local claimed = body_claim()
return {created, claimed[1]}
