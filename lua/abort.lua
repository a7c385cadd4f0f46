--[[
abort: phase two (abort) of a 2PC branch at a key-value participant. Idempotent.

A prepared branch releases its locks (only those still owned by this barrier) and drops its
staged writes; a refused one is just marked aborted. If no prepare was seen yet, an `aborted`
tombstone is written so that a late prepare votes no instead of locking ("hanging" prepare).
Every aborted barrier expires after the retention window. A repeat is a no-op.

Input:
  KEYS[1]      barrier, rtx:bar:<participant>:<txn> (hash)
  KEYS[2i]     i-th distinct user key of the branch (i = 1..n, in Branch::keys() order)
  KEYS[2i+1]   lock of that key, rtx:lock:<key>
  ARGV[1]      participant name (prefix of the recorded reason)
  ARGV[2]      now, ms since the epoch
  ARGV[3]      retention of the aborted barrier, ms; it is kept at least until the
               branch's deadline plus a clock-skew margin (a duplicate prepare arriving before
               the deadline must find it)
  ARGV[4]      the longest transaction timeout, ms: a tombstone (deadline unknown) is kept
               at least this long plus the margin

Output: {code, detail}
   1, ""       aborted now (it was prepared or refused)
   2, ""       already aborted (a repeat)
   3, ""       no prepare seen: tombstone written
  -1, ""       already committed: the abort contradicts the decision; nothing changed
  -2, detail   the KEYS differ from the keys the branch was prepared with; nothing changed
]]
-- rcall, bar, expire_after, prepared_keys, release: lua/lib/barrier.lua (prepended).
local name = ARGV[1]

local state = rcall('HGET', bar, 'state')
if state == 'aborted' then
  return {2, ''}
end
if state == 'committed' then
  return {-1, ''}
end
if not state then
  rcall('HSET', bar, 'state', 'aborted', 'reason', name .. ': aborted before prepare', 'done', ARGV[2])
  rcall('PEXPIRE', bar, string.format('%d', math.max(tonumber(ARGV[3]), tonumber(ARGV[4]) + SKEW_MS)))
  return {3, ''}
end

if state == 'prepared' then
  local keys, differ = prepared_keys()
  if not keys then
    return {-2, differ}
  end
  release(keys)
  rcall('HSET', bar, 'reason', name .. ': transaction was aborted')
end
rcall('HSET', bar, 'state', 'aborted', 'done', ARGV[2])
expire_after(tonumber(rcall('HGET', bar, 'deadline') or '0'))
return {1, ''}
