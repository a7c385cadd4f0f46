--[[
fenced: runs a batch of writes atomically, only while the caller holds the lease of every
partition the batch writes. The coordinator's every write goes through this one script; it holds
no protocol rule (the Rust state machine decided the writes), it only makes them atomic and
fenced.

All checks happen before the first write: on a Redis over its memory limit the first write
fails and nothing is applied (Redis refuses a script's first write under OOM and never a later
one), so a batch is applied entirely or not at all.

Input:
  KEYS[1..m]     the leases, rtx:lease:{P} (strings "<token>:<owner>"), one per partition written
  KEYS[m+1..]    every key the commands touch (declared for Redis Cluster)
  ARGV[1]        m, the number of leases
  ARGV[2..m+1]   the lease values the caller holds, in the order of KEYS[1..m]
  ARGV[m+2..]    the commands, one after the other, each as its argument count n followed by
                 its n arguments (the command name first), e.g. 3, "ZREM", "rtx:live:{3}", "t1"

Output:
  {1, n}             applied: n commands ran
  {0, i, holder}     fenced: lease i (1-based) is held by `holder` ("" when nobody holds it);
                     nothing ran
]]
local rcall = redis.call
local m = tonumber(ARGV[1])
for i = 1, m do
  local holder = rcall('GET', KEYS[i])
  if holder ~= ARGV[i + 1] then
    return {0, i, holder or ''}
  end
end
local i, n, count = m + 2, #ARGV, 0
while i <= n do
  local len = tonumber(ARGV[i])
  rcall(unpack(ARGV, i + 1, i + len))
  i = i + len + 1
  count = count + 1
end
return {1, count}
