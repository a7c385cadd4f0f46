--[[
fenced: runs a batch of writes of one partition atomically, only while the caller holds the
partition's lease. The coordinator's every write goes through this one script; it holds no
protocol rule (the Rust state machine decided the writes), it only makes them atomic and fenced.

All checks happen before the first write: on a Redis over its memory limit the first write
fails and nothing is applied (Redis refuses a script's first write under OOM and never a later
one), so a batch is applied entirely or not at all.

Input:
  KEYS[1]      the lease, rtx:lease:{P} (string "<token>:<owner>")
  KEYS[2..]    every key the commands touch (declared for Redis Cluster; all carry {P})
  ARGV[1]      the lease value the caller holds
  ARGV[2..]    the commands, one after the other, each as its argument count n followed by its
               n arguments (the command name first), e.g. 3, "ZREM", "rtx:live:{3}", "t1", ...

Output:
  {1, n}             applied: n commands ran
  {0, holder}        fenced: the lease is held by `holder` ("" when nobody holds it); nothing ran
]]
local rcall = redis.call
local holder = rcall('GET', KEYS[1])
if holder ~= ARGV[1] then
  return {0, holder or ''}
end
local i, n, count = 2, #ARGV, 0
while i <= n do
  local len = tonumber(ARGV[i])
  rcall(unpack(ARGV, i + 1, i + len))
  i = i + len + 1
  count = count + 1
end
return {1, count}
