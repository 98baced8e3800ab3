#!lua
-- Commit a batch: each request entry's state change, acknowledgement and event, in one
-- atomic step. Runs inside MULTI, after WATCH on the count of every user in the batch.
-- The caller decided every outcome (lending/commit.py encodes the records); this script
-- checks that each entry is still pending on this consumer and applies its record.
--
-- KEYS[1]  lend request stream          KEYS[5]  automated storage set
-- KEYS[2]  return request stream        KEYS[6]  shelving returns stream
-- KEYS[3]  events stream                KEYS[7]  from-shelving hash (book -> context)
-- KEYS[4]  lent-books hash              KEYS[8]  grants ledger hash (book -> context)
-- KEYS[9]  the limits the namespace's workers enforce ({NS}:config, a hash)
-- KEYS[10..] user count keys, user books sets and reservation sets, named by index
--          (1 = KEYS[10])
-- ARGV[1]  consumer group    ARGV[2]  consumer (this worker)    ARGV[3]  storage capacity
-- ARGV[4], ARGV[5]  lowest and highest lend entry id of the batch ('' if none)
-- ARGV[6], ARGV[7]  lowest and highest return entry id of the batch ('' if none)
-- ARGV[8]  N; ARGV[9..8+N] the limits this worker decided under, field/value pairs
-- ARGV[9+N]  M; then M pairs: a count key index and the count the batch was decided under
-- then one record per entry: its kind, then its event's seven values (request_id,
--          action, user_id, status, books, skipped, reason), then by kind:
--   'X' rejected: nothing more
--   'L' lend:     count key index, user books key index, reservation key index, S, S
--                 books reserved from storage, G, G books shelving handed to this request
--   'T' return:   count key index, user books key index
--
-- An accepted lend lends its stored and granted books; a denied one gives them back
-- (storage while it has room, the rest to shelving with their context). A returned
-- return takes back the books its event names. Counts change by one INCRBY per user,
-- and each user's books set ({NS}:user:<id>:books) with lent-books.
--
-- Returns {-2, field, theirs, mine} when KEYS[9] holds other limits than the caller's,
-- or misses one (theirs ''): nothing is written. A worker that stalled while the others
-- were restarted with new limits must not commit what it decided under its old ones;
-- its heartbeat finds out whether it must stop. Returns -1 when a lend's reservation is
-- not what the caller decided on, or a user's count not the one it read: nothing is
-- written, decide again. (WATCH guards the counts already. Checked here as well, a
-- limit holds even for a commit Redis ran without its MULTI: refused, for an ACL
-- changed under a running worker, MULTI leaves the script to run on its own.) Else one code per
-- record: 1 committed here, 0 not (the entry is pending on another consumer, or
-- finished): then nothing is written for it, and shelving grants it holds stay in the
-- ledger for the reconciliation (reconcile.lua).
--
-- Failure first: every check and read comes before the first write, and the first
-- write is an XADD (refused as a whole under OOM), so a call that fails changes
-- nothing and its entries stay pending.

local MAX_MS = '18446744073709551615-'
local group, consumer = ARGV[1], ARGV[2]

-- The checks return what is wrong (nil: nothing), for the script to answer as an error.
local function wrong_type(key, kind)
  local found = redis.call('TYPE', key).ok
  if found ~= 'none' and found ~= kind then return 'WRONGTYPE ' .. key .. ' holds a ' .. found .. ', not a ' .. kind end
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

local function not_a_count(key)
  local value = redis.call('GET', key)
  if value and not (string.match(value, '^-?%d+$') and #value < 19) then
    return 'NOTINTEGER ' .. key .. ' holds ' .. value .. ', not a count'
  end
end

local function pending_on_me(stream, first, last)
  local set = {}
  if first == '' then return set end
  for _, entry in ipairs(redis.call('XPENDING', stream, group, first, last, 1000000, consumer)) do
    set[entry[1]] = true
  end
  return set
end

-- The limits first: a decision under other limits than the namespace's is not applied,
-- nor one under limits KEYS[9] does not hold (a field missing, not a hash: older data
-- or a hand edit, which the worker's heartbeat, run at once, sets right). With no
-- KEYS[9] at all nothing was published (a Redis that lost its data, until the
-- heartbeat publishes it again): nothing to compare with.
local limits = tonumber(ARGV[8])
local config = redis.call('TYPE', KEYS[9]).ok
local compared = config == 'none' and 0 or limits
if compared > 0 and config ~= 'hash' then return {-2, ARGV[9], '', ARGV[10]} end
for k = 9, 8 + compared, 2 do
  local theirs = redis.call('HGET', KEYS[9], ARGV[k])
  if not theirs or tonumber(theirs) ~= tonumber(ARGV[k + 1]) then return {-2, ARGV[k], theirs or '', ARGV[k + 1]} end
end

-- The counts the batch was decided under.
local i = 9 + limits
local counts = {}
for _ = 1, tonumber(ARGV[i]) do
  counts[#counts + 1] = {KEYS[9 + tonumber(ARGV[i + 1])], tonumber(ARGV[i + 2])}
  i = i + 2
end
i = i + 1

-- Parse the records.
local records = {}
local function take()
  i = i + 1
  return ARGV[i - 1]
end
local function take_list()
  local out = {}
  for _ = 1, tonumber(take()) do out[#out + 1] = take() end
  return out
end
while i <= #ARGV do
  local r = {kind = take(), event = {}}
  for _, name in ipairs({'request_id', 'action', 'user_id', 'status', 'books', 'skipped', 'reason'}) do
    r.event[#r.event + 1] = name
    r.event[#r.event + 1] = take()
  end
  r.id, r.action, r.user, r.status, r.books = r.event[2], r.event[4], r.event[6], r.event[8], r.event[10]
  if r.kind == 'L' then
    r.count = KEYS[9 + tonumber(take())]
    r.loans = KEYS[9 + tonumber(take())]
    r.reservation = KEYS[9 + tonumber(take())]
    r.stored = take_list()
    r.granted = take_list()
  elseif r.kind == 'T' then
    r.count = KEYS[9 + tonumber(take())]
    r.loans = KEYS[9 + tonumber(take())]
  end
  records[#records + 1] = r
end

-- Are the counts what was decided on? (One that is not a count fails below.)
for _, read in ipairs(counts) do
  local found = tonumber(redis.call('GET', read[1]) or '0')
  if found and found ~= read[2] then return -1 end
end

-- Which entries are still mine, and are the lends' reservations what was decided on?
local mine = {lend = pending_on_me(KEYS[1], ARGV[4], ARGV[5]), ['return'] = pending_on_me(KEYS[2], ARGV[6], ARGV[7])}
local results = {}
for n, r in ipairs(records) do
  results[n] = mine[r.action][r.id] and 1 or 0
  if results[n] == 1 and r.kind == 'L' then
    if redis.call('SCARD', r.reservation) ~= #r.stored then return -1 end
    for _, book in ipairs(r.stored) do
      if redis.call('SISMEMBER', r.reservation, book) == 0 then return -1 end
    end
  end
end

-- Plan every write.
local events, acks = {}, {lend = {}, ['return'] = {}}
local lent_pairs, unlent, taken_pairs, reservations = {}, {}, {}, {}
local deltas, delta_keys = {}, {}
local loans_added, loans_removed, loans_keys = {}, {}, {}
local granted, granted_to = {}, {}
local to_storage, back, back_contexts, back_lookup = {}, {}, {}, {}
local room = nil

-- Each user's books set changes with lent-books (adds and removes of one batch never
-- touch the same book: a book lent in this batch was not lent when returns were decided).
local function loans_of(key)
  if loans_added[key] == nil then
    loans_added[key], loans_removed[key] = {}, {}
    loans_keys[#loans_keys + 1] = key
  end
end

local function add_delta(key, n)
  if deltas[key] == nil then
    deltas[key] = 0
    delta_keys[#delta_keys + 1] = key
  end
  deltas[key] = deltas[key] + n
end

-- A book leaving the library's hands: into storage while there is room (keeping the
-- context it came from shelving under), else back to shelving with that context
-- (given, or looked up in from-shelving below).
local function give_back(book, context)
  if room == nil then room = tonumber(ARGV[3]) - redis.call('SCARD', KEYS[5]) end
  if room > 0 then
    room = room - 1
    to_storage[#to_storage + 1] = book
    if context then
      taken_pairs[#taken_pairs + 1] = book
      taken_pairs[#taken_pairs + 1] = context
    end
  else
    back[#back + 1] = book
    back_contexts[#back] = context
    if not context then back_lookup[#back_lookup + 1] = #back end
  end
end

for n, r in ipairs(records) do
  if results[n] == 1 then
    events[#events + 1] = r.event
    acks[r.action][#acks[r.action] + 1] = r.id
    if r.kind == 'L' then
      reservations[#reservations + 1] = r.reservation
      for _, book in ipairs(r.granted) do
        granted[#granted + 1] = book
        granted_to[#granted] = r.id
      end
      if r.status == 'accepted' then
        for _, list in ipairs({r.stored, r.granted}) do
          for _, book in ipairs(list) do
            lent_pairs[#lent_pairs + 1] = book
            lent_pairs[#lent_pairs + 1] = r.user
            loans_of(r.loans)
            table.insert(loans_added[r.loans], book)
          end
        end
        for _, book in ipairs(r.granted) do
          taken_pairs[#taken_pairs + 1] = book
          taken_pairs[#taken_pairs + 1] = r.id
        end
        add_delta(r.count, #r.stored + #r.granted)
      else
        for _, book in ipairs(r.stored) do give_back(book, nil) end
        for _, book in ipairs(r.granted) do give_back(book, r.id) end
      end
    elseif r.kind == 'T' and r.status == 'returned' then
      local count = 0
      for book in string.gmatch(r.books, '[^,]+') do
        unlent[#unlent + 1] = book
        loans_of(r.loans)
        table.insert(loans_removed[r.loans], book)
        give_back(book, nil)
        count = count + 1
      end
      add_delta(r.count, -count)
    end
  end
end

if #back_lookup > 0 then
  local wanted = {}
  for k, index in ipairs(back_lookup) do wanted[k] = back[index] end
  local found = redis.call('HMGET', KEYS[7], unpack(wanted))
  for k, index in ipairs(back_lookup) do back_contexts[index] = found[k] or '' end
end
-- A grant is settled only if the ledger still names this request for it.
local settled = {}
if #granted > 0 then
  local holders = redis.call('HMGET', KEYS[8], unpack(granted))
  for k, book in ipairs(granted) do
    if holders[k] == granted_to[k] then settled[#settled + 1] = book end
  end
end

-- Check everything that could make a write fail.
local problem = (#events > 0 and no_room(KEYS[3])) or (#back > 0 and no_room(KEYS[6]))
  or wrong_type(KEYS[4], 'hash') or wrong_type(KEYS[5], 'set')
  or wrong_type(KEYS[7], 'hash') or wrong_type(KEYS[8], 'hash')
for _, key in ipairs(delta_keys) do problem = problem or not_a_count(key) end
for _, key in ipairs(loans_keys) do problem = problem or wrong_type(key, 'set') end
if problem then return redis.error_reply(problem) end

-- Write: the XADDs first.
for _, fields in ipairs(events) do redis.call('XADD', KEYS[3], '*', unpack(fields)) end
if #back > 0 then
  redis.call('XADD', KEYS[6], '*', 'book_ids', table.concat(back, ','), 'context_ids', table.concat(back_contexts, ','))
  redis.call('HDEL', KEYS[7], unpack(back))
end
if #lent_pairs > 0 then redis.call('HSET', KEYS[4], unpack(lent_pairs)) end
if #unlent > 0 then redis.call('HDEL', KEYS[4], unpack(unlent)) end
for _, key in ipairs(delta_keys) do
  -- A count that reaches zero is deleted: a missing count means zero.
  if deltas[key] ~= 0 and redis.call('INCRBY', key, deltas[key]) <= 0 then redis.call('DEL', key) end
end
for _, key in ipairs(loans_keys) do
  if #loans_added[key] > 0 then redis.call('SADD', key, unpack(loans_added[key])) end
  if #loans_removed[key] > 0 then redis.call('SREM', key, unpack(loans_removed[key])) end
end
if #to_storage > 0 then redis.call('SADD', KEYS[5], unpack(to_storage)) end
if #taken_pairs > 0 then redis.call('HSET', KEYS[7], unpack(taken_pairs)) end
if #settled > 0 then redis.call('HDEL', KEYS[8], unpack(settled)) end
if #reservations > 0 then redis.call('DEL', unpack(reservations)) end
if #acks.lend > 0 then redis.call('XACK', KEYS[1], group, unpack(acks.lend)) end
if #acks['return'] > 0 then redis.call('XACK', KEYS[2], group, unpack(acks['return'])) end
return results
