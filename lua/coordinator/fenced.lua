--[[
fenced: runs a batch of writes atomically, only while the caller holds the lease of every
partition the batch writes, and only right after the caller's previous write of each of them.
The coordinator's every write goes through this one script; it holds no protocol rule (the Rust
state machine decided the writes), it only makes them atomic, fenced and in sequence.

The sequence: the coordinator sends its next write before the previous one is answered. A write
is stepped on top of the previous one's effects, so it must not be applied when that one was not
(refused under OOM, lost with a connection, sent again after NOSCRIPT). Each partition has a write
counter, rtx:wseq:{P}; a write names the value it follows and the counter moves on by one when
the write is applied. A write that names another value is refused whole.

All checks happen before the first write: on a Redis over its memory limit the first write
fails and nothing is applied (Redis refuses a script's first write under OOM and never a later
one), so a batch is applied entirely or not at all.

Input:
  KEYS[1..m]       the leases, rtx:lease:{P} (strings "<token>:<owner>"), one per partition written
  KEYS[m+1..2m]    the write counters, rtx:wseq:{P}, in the same order
  KEYS[2m+1..]     every key the commands touch (declared for Redis Cluster)
  ARGV[1]          m, the number of leases
  ARGV[2..m+1]     the lease values the caller holds, in the order of KEYS[1..m]
  ARGV[m+2..2m+1]  the counter value each partition's write follows (0 when the key is missing)
  ARGV[2m+2..]     the commands, one after the other, each as its argument count n followed by
                   its n arguments (the command name first), e.g. 3, "ZREM", "rtx:live:{3}", "t1"

Output:
  {1, n}             applied: n commands ran, every counter moved on by one
  {0, i, holder}     fenced: lease i (1-based) is held by `holder` ("" when nobody holds it);
                     nothing ran
  {2, i, value}      out of sequence: counter i holds `value`, not the one named (an earlier
                     write was not applied); nothing ran
]]
local rcall = redis.call
local m = tonumber(ARGV[1])
for i = 1, m do
  local holder = rcall('GET', KEYS[i])
  if holder ~= ARGV[i + 1] then
    return {0, i, holder or ''}
  end
end
for i = 1, m do
  local seq = rcall('GET', KEYS[m + i]) or '0'
  if seq ~= ARGV[m + 1 + i] then
    return {2, i, seq}
  end
end
for i = 1, m do
  rcall('INCR', KEYS[m + i])
end
local i, n, count = 2 * m + 2, #ARGV, 0
while i <= n do
  local len = tonumber(ARGV[i])
  rcall(unpack(ARGV, i + 1, i + len))
  i = i + len + 1
  count = count + 1
end
return {1, count}
