# -*- test-case-name: tests.test_sharedscripts -*-
"""The Lua scripts that Redis runs for the shared state (sharedstate.py), atomically.

Each script is one step of what the instances share (sharedstate.py's docstring says
which and why): ``ENTER``, ``START``, ``FINISH`` and ``LEAVE`` for the brute-force
penalty's lanes, ``CLAIM`` and ``RELEASE`` for the session counts, ``HEARTBEAT_SCRIPT``
(with the janitor of instances gone silent), ``RESYNC`` and ``GOODBYE`` for an
instance's own counts. redisstate.py loads them once (SCRIPT LOAD) and runs them by
their SHA (EVALSHA). Pure text: nothing here runs in Python.
"""

from __future__ import annotations

#: Dead instances the janitor clears per heartbeat, and their keys per instance.
JANITOR_INSTANCES = 8
JANITOR_KEYS = 1000

#: Prepended to every script: the time (Redis' own unless given), the penalty's
#: doubling (penalty.delay), and a lane's live failures (expired ones deleted).
_PRELUDE = """
local function clock(given)
  local now = tonumber(given)
  if now then return now end
  local t = redis.call('TIME')
  return tonumber(t[1]) + tonumber(t[2]) / 1000000
end
local function fmt(x) return string.format('%.6f', x) end
local function delay(n, base, cap)
  if n <= 0 or base <= 0 then return 0 end
  return math.min(cap, base * 2 ^ math.min(n - 1, 64))
end
local function failures(key, since)
  local fields = redis.call('HGETALL', key)
  local live, old = {}, {}
  for i = 1, #fields, 2 do
    if string.sub(fields[i], 1, 2) == 'f:' then
      local when = tonumber(fields[i + 1])
      if when and when >= since then live[#live + 1] = {fields[i], when}
      else old[#old + 1] = fields[i] end
    end
  end
  if #old > 0 then redis.call('HDEL', key, unpack(old)) end
  return live
end
"""

#: KEYS: address lane, its turns, user lane, its turns.
#: ARGV: address, token, now, base, cap, memory, known_memory, bound (address), bound
#: (user), lease.
#: Answers {'refused', 'address'|'user'} or {'ok', known, address failures, user
#: failures, seconds to wait, turns reserved}. The lanes are chosen as in
#: Penalty.submit.
ENTER = _PRELUDE + """
local address, token = ARGV[1], ARGV[2]
local now = clock(ARGV[3])
local base, cap = tonumber(ARGV[4]), tonumber(ARGV[5])
local memory, known_memory = tonumber(ARGV[6]), tonumber(ARGV[7])
local lease = tonumber(ARGV[10])
local a_live = failures(KEYS[1], now - memory)
local u_live = failures(KEYS[3], now - memory)
local since = tonumber(redis.call('HGET', KEYS[3], 'k:' .. address))
local known = since ~= nil and since >= now - known_memory
local lanes = {}
if not (known and #u_live == 0) and #a_live > 0 then
  lanes[#lanes + 1] = {KEYS[1], KEYS[2], #a_live, tonumber(ARGV[8]), 'address'}
end
if not known and #u_live > 0 then
  lanes[#lanes + 1] = {KEYS[3], KEYS[4], #u_live, tonumber(ARGV[9]), 'user'}
end
local slot = now
for _, lane in ipairs(lanes) do
  redis.call('ZREMRANGEBYSCORE', lane[2], '-inf', '(' .. fmt(now - lease))
  -- waiting: every turn but the first, when that one is due (it runs, or is about to)
  local waiting = redis.call('ZCARD', lane[2])
  local first = redis.call('ZRANGE', lane[2], 0, 0, 'WITHSCORES')
  if #first > 0 and tonumber(first[2]) <= now then waiting = waiting - 1 end
  if waiting >= lane[4] then
    return {'refused', lane[5]}
  end
  local last = redis.call('ZRANGE', lane[2], -1, -1, 'WITHSCORES')
  if #last > 0 then slot = math.max(slot, tonumber(last[2]) + delay(lane[3], base, cap)) end
  local after = tonumber(redis.call('HGET', lane[1], 'next'))
  if after then slot = math.max(slot, after) end
end
for _, lane in ipairs(lanes) do
  redis.call('ZADD', lane[2], fmt(slot), token)
  redis.call('PEXPIRE', lane[2], math.ceil((slot - now + lease) * 1000))
end
return {'ok', known and 1 or 0, #a_live, #u_live, fmt(slot - now), #lanes}
"""

#: KEYS: address lane, its turns, user lane, its turns. ARGV: token, now, lease.
#: Asked when an attempt's turn has come. Each lane it holds a turn in is checked one
#: at a time: while an earlier turn is there (its check runs, or it waits in its own
#: process's queue), it answers 'busy' (ask again later); else the seconds to wait
#: still, until the lanes' ``next`` (delay(n) after the end of the last check), as a
#: process's own queue does ('0.000000': it may start now).
START = _PRELUDE + """
local token, now = ARGV[1], clock(ARGV[2])
local lease = tonumber(ARGV[3])
local wait = 0
for _, lane in ipairs({{KEYS[1], KEYS[2]}, {KEYS[3], KEYS[4]}}) do
  local mine = tonumber(redis.call('ZSCORE', lane[2], token))
  if mine then
    redis.call('ZREMRANGEBYSCORE', lane[2], '-inf', '(' .. fmt(now - lease))
    if redis.call('ZCOUNT', lane[2], '-inf', '(' .. fmt(mine)) > 0 then
      return 'busy'
    end
    local after = tonumber(redis.call('HGET', lane[1], 'next'))
    if after and after > now then wait = math.max(wait, after - now) end
  end
end
return fmt(wait)
"""

#: KEYS: address lane, its turns, user lane, its turns.
#: ARGV: address, token, outcome, user (hex), fingerprint (hex, or ''), now, base, cap,
#: memory, known_memory, fingerprints kept, known addresses kept.
#: As Penalty.finish: a failure is remembered in both lanes (the same fingerprint again
#: only moves its time); a success forgets the user's failures (at this address, and
#: the user's own) and makes the address known; then each lane with failures may not
#: start its next check before delay(n) from now (turns already given keep theirs).
FINISH = _PRELUDE + """
local address, token, outcome, user, fp = ARGV[1], ARGV[2], ARGV[3], ARGV[4], ARGV[5]
local now = clock(ARGV[6])
local base, cap = tonumber(ARGV[7]), tonumber(ARGV[8])
local memory, known_memory = tonumber(ARGV[9]), tonumber(ARGV[10])
local max_prints, max_known = tonumber(ARGV[11]), tonumber(ARGV[12])
redis.call('ZREM', KEYS[2], token)
redis.call('ZREM', KEYS[4], token)
local mine = 'f:' .. user .. ':'
if outcome == 'failure' and fp ~= '' then
  redis.call('HSET', KEYS[1], mine .. fp, fmt(now))
  redis.call('HSET', KEYS[3], 'f:' .. fp, fmt(now))
elseif outcome == 'success' then
  for _, lane in ipairs({{KEYS[1], mine}, {KEYS[3], 'f:'}}) do
    local drop = {}
    for _, f in ipairs(redis.call('HKEYS', lane[1])) do
      if string.sub(f, 1, #lane[2]) == lane[2] then drop[#drop + 1] = f end
    end
    if #drop > 0 then redis.call('HDEL', lane[1], unpack(drop)) end
  end
  redis.call('HSET', KEYS[3], 'k:' .. address, fmt(now))
end
local newest_first = function(a, b) return a[2] > b[2] end
for _, key in ipairs({KEYS[1], KEYS[3]}) do
  local live = failures(key, now - memory)
  table.sort(live, newest_first)
  for i = max_prints + 1, #live do redis.call('HDEL', key, live[i][1]) end
  local n = math.min(#live, max_prints)
  local ttl = 0
  if n > 0 then
    local after = now + delay(n, base, cap)
    redis.call('HSET', key, 'next', fmt(after))
    ttl = math.max(memory, after - now)
  else
    redis.call('HDEL', key, 'next')
  end
  if key == KEYS[3] then
    local known = {}
    local fields = redis.call('HGETALL', key)
    for i = 1, #fields, 2 do
      if string.sub(fields[i], 1, 2) == 'k:' then
        known[#known + 1] = {fields[i], tonumber(fields[i + 1]) or 0}
      end
    end
    table.sort(known, newest_first)
    local kept = 0
    for _, k in ipairs(known) do
      if kept < max_known and k[2] >= now - known_memory then kept = kept + 1
      else redis.call('HDEL', key, k[1]) end
    end
    if kept > 0 then ttl = math.max(ttl, known_memory) end
  end
  if ttl > 0 then redis.call('PEXPIRE', key, math.ceil(ttl * 1000)) end
end
return 1
"""

#: KEYS: address turns, user turns. ARGV: token. The client went away while waiting.
LEAVE = """
redis.call('ZREM', KEYS[1], ARGV[1])
redis.call('ZREM', KEYS[2], ARGV[1])
return 1
"""

#: Prepended to the session scripts: is this instance still counted as live (its
#: heartbeat recent), and mark it live now. A stale instance's fields may have been
#: dropped by another one's janitor: it must RESYNC.
_LIVE = """
local function alive(instances, id, now, ttl)
  local beat = tonumber(redis.call('ZSCORE', instances, id))
  redis.call('ZADD', instances, fmt(now), id)
  if beat == nil or beat < now - ttl then return 0 end
  return 1
end
"""

#: KEYS: the (user, address) counts, the live instances, this instance's count keys.
#: ARGV: instance id, limit (0: none), now, instance ttl.
#: Answers {granted 1/0, sessions counted (with this one if granted), live 1/0}.
CLAIM = _PRELUDE + _LIVE + """
local id, limit = ARGV[1], tonumber(ARGV[2])
local now, ttl = clock(ARGV[3]), tonumber(ARGV[4])
local live = alive(KEYS[2], id, now, ttl)
local fields = redis.call('HGETALL', KEYS[1])
local total, dead = 0, {}
for i = 1, #fields, 2 do
  local other, n = fields[i], tonumber(fields[i + 1]) or 0
  if other ~= id then
    local beat = tonumber(redis.call('ZSCORE', KEYS[2], other))
    if beat == nil or beat < now - ttl then dead[#dead + 1] = other; n = 0 end
  end
  total = total + n
end
if #dead > 0 then redis.call('HDEL', KEYS[1], unpack(dead)) end
if limit > 0 and total >= limit then return {0, total, live} end
redis.call('HINCRBY', KEYS[1], id, 1)
redis.call('SADD', KEYS[3], KEYS[1])
return {1, total + 1, live}
"""

#: KEYS: the (user, address) counts, this instance's count keys. ARGV: instance id.
RELEASE = """
local left = redis.call('HINCRBY', KEYS[1], ARGV[1], -1)
if left <= 0 then
  redis.call('HDEL', KEYS[1], ARGV[1])
  redis.call('SREM', KEYS[2], KEYS[1])
end
return left
"""

#: KEYS: the live instances, the shared hashing key.
#: ARGV: instance id, now, instance ttl, prefix of instances' count keys, a key to
#: offer (hex; '' with a key_file: then none is kept in Redis).
#: Answers {live 1/0, the hashing key kept in Redis (hex) or ''}. Clears the counts
#: of up to JANITOR_INSTANCES instances gone silent, JANITOR_KEYS keys each.
HEARTBEAT_SCRIPT = _PRELUDE + _LIVE + f"""
local id, now, ttl = ARGV[1], clock(ARGV[2]), tonumber(ARGV[3])
local live = alive(KEYS[1], id, now, ttl)
local gone = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', '(' .. fmt(now - ttl),
                        'LIMIT', 0, {JANITOR_INSTANCES})
for _, other in ipairs(gone) do
  local set = ARGV[4] .. other
  for _, key in ipairs(redis.call('SPOP', set, {JANITOR_KEYS})) do
    redis.call('HDEL', key, other)
  end
  if redis.call('SCARD', set) == 0 then redis.call('ZREM', KEYS[1], other) end
end
local key = ''
if ARGV[5] ~= '' then
  redis.call('SET', KEYS[2], ARGV[5], 'NX')
  key = redis.call('GET', KEYS[2])
end
return {{live, key}}
"""

#: KEYS: the live instances, this instance's count keys.
#: ARGV: instance id, now, clear first (1/0), then pairs of (counts key, count).
RESYNC = _PRELUDE + """
local id = ARGV[1]
redis.call('ZADD', KEYS[1], fmt(clock(ARGV[2])), id)
if ARGV[3] == '1' then
  for _, key in ipairs(redis.call('SMEMBERS', KEYS[2])) do redis.call('HDEL', key, id) end
  redis.call('DEL', KEYS[2])
end
for i = 4, #ARGV, 2 do
  redis.call('HSET', ARGV[i], id, ARGV[i + 1])
  redis.call('SADD', KEYS[2], ARGV[i])
end
return 1
"""

#: KEYS: the live instances, this instance's count keys. ARGV: instance id.
#: A clean stop: this instance's sessions stop counting at once.
GOODBYE = """
for _, key in ipairs(redis.call('SMEMBERS', KEYS[2])) do redis.call('HDEL', key, ARGV[1]) end
redis.call('DEL', KEYS[2])
redis.call('ZREM', KEYS[1], ARGV[1])
return 1
"""

SCRIPTS = {"enter": ENTER, "start": START, "finish": FINISH, "leave": LEAVE, "claim": CLAIM,
           "release": RELEASE, "heartbeat": HEARTBEAT_SCRIPT, "resync": RESYNC,
           "goodbye": GOODBYE}
