#!lua
-- Finish a request entry that keeps failing: its `failed` event, a dead letter, the
-- books it holds given back (its reservation, and the shelving grants the ledger names
-- it for), and the acknowledgement, in one step.
--
-- KEYS[1]  the entry's request stream
-- KEYS[2]  events stream ({NS}:events)
-- KEYS[3]  automated storage set ({NS}:storage)
-- KEYS[4]  a lend request's reservation set ({NS}:reservations:<request_id>)
-- KEYS[5]  shelving returns stream ({NS}:shelving:returns)
-- KEYS[6]  dead-letters stream ({NS}:dead-letters)
-- KEYS[7]  books the library took from shelving ({NS}:from-shelving): book -> context
-- KEYS[8]  grants ledger ({NS}:grants): book -> context
-- KEYS[9]  how many dead letters the cap dropped ({NS}:dead-letters:trimmed, a count)
-- KEYS[10] the limits the namespace's workers enforce ({NS}:config, a hash; anything
--          else publishes none)
-- ARGV[1]  consumer group
-- ARGV[2]  entry id
-- ARGV[3]  storage capacity (this worker's; the namespace's when that is smaller: a
--          worker that stalled while the others were restarted with a smaller one
--          must not fill storage past it)
-- ARGV[4]  how many dead letters KEYS[6] keeps (--dead-letters-maxlen): the oldest
--          beyond it are dropped with the XADD (exact MAXLEN), and counted in KEYS[9]
-- ARGV[5]  1 to give back what a lend request holds, 0 for a return entry (its ids are
--          numbered apart from lend entries: the same id names another request), 2 for
--          a lend whose entry was deleted from its stream (see below)
-- ARGV[6]  N; ARGV[7..6+N] the request's books, to look up in the grants ledger
-- then P, the number of event fields, the event's P field/value pairs, and the dead
-- letter's field/value pairs
--
-- Returns 1 when finished here, 0 when the entry was no longer pending (finished
-- elsewhere): then nothing is written. A lend whose entry was deleted from its stream
-- may have left the group's pending list without being finished: our claims leave
-- such an entry pending (autoclaim.lua), but Redis 7 drops it on any other XCLAIM (an
-- older worker's, an operator's). While its reservation holds books it is not
-- finished, and is finished here (the reservation, deleted here, makes it once).
--
-- Failure first: every check and read comes before the first write, and the first
-- write is an XADD (refused as a whole under OOM), so a call that fails changes
-- nothing and the entry stays pending.

local MAX_MS = '18446744073709551615-'

-- The checks return what is wrong (nil: nothing), for the script to answer as an error.
local function wrong_type(key, kind)
  local found = redis.call('TYPE', key).ok
  if found ~= 'none' and found ~= kind then return 'WRONGTYPE ' .. key .. ' holds a ' .. found .. ', not a ' .. kind end
end

local function not_a_count(key)
  local found = redis.call('TYPE', key).ok
  if found == 'none' then return nil end
  if found ~= 'string' or not string.match(redis.call('GET', key), '^%d+$') then
    return 'WRONGTYPE ' .. key .. ' holds a ' .. found .. ', not a count'
  end
end

local function no_room(stream)
  if redis.call('EXISTS', stream) == 0 then return nil end
  local info = redis.call('XINFO', 'STREAM', stream)
  for k = 1, #info, 2 do
    if info[k] == 'last-generated-id' and string.find(info[k + 1], MAX_MS, 1, true) == 1 then
      return 'STREAMFULL ' .. stream .. ' has used up its entry IDs: no entry can be added'
    end
  end
end

local lend = ARGV[5] ~= '0'
if #redis.call('XPENDING', KEYS[1], ARGV[1], ARGV[2], ARGV[2], 1) == 0 then
  if ARGV[5] ~= '2' or redis.call('EXISTS', KEYS[4]) == 0 then return 0 end
end

local maxlen = tonumber(ARGV[4])
local n = tonumber(ARGV[6])
local p_arg = 7 + n
local last_event_arg = p_arg + 2 * tonumber(ARGV[p_arg])

-- Plan the give-back: refill storage up to its capacity, the rest to shelving, each
-- book with the context it was handed out to (a reserved book's is in from-shelving).
local to_storage, taken, rest, contexts, settled = {}, {}, {}, {}, {}
if lend then
  local books = {}
  for _, book in ipairs(redis.call('SMEMBERS', KEYS[4])) do books[#books + 1] = {book, false} end
  if n > 0 then
    local holders = redis.call('HMGET', KEYS[8], unpack(ARGV, 7, 6 + n))
    for k = 1, n do
      if holders[k] == ARGV[2] then
        books[#books + 1] = {ARGV[6 + k], ARGV[2]}
        settled[#settled + 1] = ARGV[6 + k]
      end
    end
  end
  local capacity = tonumber(ARGV[3])
  local published = wrong_type(KEYS[10], 'hash') == nil and tonumber(redis.call('HGET', KEYS[10], 'storage_capacity'))
  if published and published < capacity then capacity = published end
  local room = #books > 0 and capacity - redis.call('SCARD', KEYS[3]) or 0
  local lookup = {}
  for _, item in ipairs(books) do
    if room > 0 then
      room = room - 1
      to_storage[#to_storage + 1] = item[1]
      if item[2] then
        taken[#taken + 1] = item[1]
        taken[#taken + 1] = item[2]
      end
    else
      rest[#rest + 1] = item[1]
      contexts[#rest] = item[2] or ''
      if not item[2] then lookup[#lookup + 1] = #rest end
    end
  end
  if #lookup > 0 then
    local wanted = {}
    for k, index in ipairs(lookup) do wanted[k] = rest[index] end
    local found = redis.call('HMGET', KEYS[7], unpack(wanted))
    for k, index in ipairs(lookup) do contexts[index] = found[k] or '' end
  end
end

local problem = no_room(KEYS[2]) or no_room(KEYS[6]) or (#rest > 0 and no_room(KEYS[5]))
  or wrong_type(KEYS[3], 'set') or wrong_type(KEYS[4], 'set') or wrong_type(KEYS[7], 'hash')
  or wrong_type(KEYS[8], 'hash') or not_a_count(KEYS[9])
if problem then return redis.error_reply(problem) end
-- Exact MAXLEN: the letters dropped are those beyond the cap.
local dropped = math.max(0, redis.call('XLEN', KEYS[6]) + 1 - maxlen)

redis.call('XADD', KEYS[2], '*', unpack(ARGV, p_arg + 1, last_event_arg))
redis.call('XADD', KEYS[6], 'MAXLEN', maxlen, '*', unpack(ARGV, last_event_arg + 1))
if dropped > 0 then redis.call('INCRBY', KEYS[9], dropped) end
if #rest > 0 then
  redis.call('XADD', KEYS[5], '*', 'book_ids', table.concat(rest, ','), 'context_ids', table.concat(contexts, ','))
  redis.call('HDEL', KEYS[7], unpack(rest))
end
if #to_storage > 0 then redis.call('SADD', KEYS[3], unpack(to_storage)) end
if #taken > 0 then redis.call('HSET', KEYS[7], unpack(taken)) end
if #settled > 0 then redis.call('HDEL', KEYS[8], unpack(settled)) end
if lend then redis.call('DEL', KEYS[4]) end
redis.call('XACK', KEYS[1], ARGV[1], ARGV[2])
return 1
