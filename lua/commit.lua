-- Commit a batch of requests: every outcome's state change, acknowledgement and
-- event, all in one atomic step. Runs inside MULTI after WATCH on the count of every
-- user in the batch, whose lends the caller decided against the per-user limit.
--
-- KEYS[1]  lend request stream          KEYS[5]  automated storage set
-- KEYS[2]  return request stream        KEYS[6]  shelving returns stream
-- KEYS[3]  events stream                KEYS[7]  from-shelving hash (book -> context)
-- KEYS[4]  lent-books hash              KEYS[8..] user count keys and reservation sets,
--                                                 referred to by index below
-- ARGV[1]  consumer group    ARGV[2]  consumer (this worker)    ARGV[3]  storage capacity
-- ARGV[4], ARGV[5]  lowest and highest lend entry id of the batch ('' if none)
-- ARGV[6], ARGV[7]  lowest and highest return entry id of the batch ('' if none)
-- then one record per request, first field its kind:
--   'X' rejected:  action, entry id, user id (as shown), reason
--   'L' lend:      entry id, user id, count key index, reservation key index,
--                  status ('accepted' or 'denied'), books lent (csv), skipped (csv), reason,
--                  S, S books reserved from storage, N, N books newly handed out by
--                  shelving to this caller, H, H books shelving already held for it
--   'T' return:    entry id, user id, count key index, books returned (csv),
--                  skipped (csv), reason
--
-- Returns -1 when a lend's reservation is not what the caller decided on (another
-- worker processing the same entry added to it): nothing is written, decide again.
-- Else one code per record: 1 committed here, 0 not committed (the entry is pending
-- on another consumer, or finished already).
--
-- A record is committed only if its entry is pending on this consumer. A lend that is
-- not mine anymore hands over its shelving grants: if another consumer still works on
-- the entry, they join its reservation (so that consumer sees a changed reservation
-- and takes them); if the entry is finished, a book handed out anew to this caller
-- that the library has no record of taking belongs to nobody and goes back to
-- shelving. Books already held were handed out earlier, to whoever answers for them.

local function pending_on(stream, first, last, consumer)
  local set = {}
  if first == '' then return set end
  local args = {stream, ARGV[1], first, last, 1000000}
  if consumer then args[#args + 1] = consumer end
  for _, entry in ipairs(redis.call('XPENDING', unpack(args))) do set[entry[1]] = true end
  return set
end

local function csv_or_empty(list) return table.concat(list, ',') end

-- Parse the records.
local records = {}
local i = 8
local function take(n)
  local out = {}
  for j = i, i + n - 1 do out[#out + 1] = ARGV[j] end
  i = i + n
  return out
end
while i <= #ARGV do
  local kind = ARGV[i]
  i = i + 1
  local r = {kind = kind}
  if kind == 'X' then
    local f = take(4)
    r.action, r.id, r.user, r.reason = f[1], f[2], f[3], f[4]
  elseif kind == 'L' then
    local f = take(8)
    r.id, r.user, r.count, r.reservation = f[1], f[2], KEYS[7 + tonumber(f[3])], KEYS[7 + tonumber(f[4])]
    r.status, r.books, r.skipped, r.reason = f[5], f[6], f[7], f[8]
    r.stored = take(tonumber(take(1)[1]))
    r.new = take(tonumber(take(1)[1]))
    r.held = take(tonumber(take(1)[1]))
  else -- 'T'
    local f = take(6)
    r.id, r.user, r.count, r.books, r.skipped, r.reason = f[1], f[2], KEYS[7 + tonumber(f[3])], f[4], f[5], f[6]
  end
  records[#records + 1] = r
end

local mine_lend = pending_on(KEYS[1], ARGV[4], ARGV[5], ARGV[2])
local mine_return = pending_on(KEYS[2], ARGV[6], ARGV[7], ARGV[2])
local function mine(r)
  if r.kind == 'T' or (r.kind == 'X' and r.action == 'return') then return mine_return[r.id] end
  return mine_lend[r.id]
end

-- Check first, write after: a lend's reservation must hold exactly its storage books.
for _, r in ipairs(records) do
  if r.kind == 'L' and mine(r) then
    if redis.call('SCARD', r.reservation) ~= #r.stored then return -1 end
    for _, book in ipairs(r.stored) do
      if redis.call('SISMEMBER', r.reservation, book) == 0 then return -1 end
    end
  end
end

local results = {}
local acks = {lend = {}, ['return'] = {}}
local events = {}
local lent_pairs, unlent = {}, {}
local deltas, delta_keys = {}, {}
local taken_pairs = {} -- from-shelving entries to write
local back, back_contexts, back_lookup = {}, {}, {} -- to shelving; lookup: context unknown yet
local to_storage = {}
local reservations_done = {}
local room = nil
local pending_any = nil

local function add_delta(key, n)
  if deltas[key] == nil then
    deltas[key] = 0
    delta_keys[#delta_keys + 1] = key
  end
  deltas[key] = deltas[key] + n
end

-- A book leaving the library's hands: into storage while there is room, else back to
-- shelving with the context it was handed out to (known, or looked up in from-shelving).
local function give_back(book, context)
  if room == nil then room = tonumber(ARGV[3]) - redis.call('SCARD', KEYS[5]) end
  if room > 0 then
    room = room - 1
    to_storage[#to_storage + 1] = book
    if context then
      taken_pairs[#taken_pairs + 1] = book
      taken_pairs[#taken_pairs + 1] = context
    end
  elseif context then
    back[#back + 1] = book
    back_contexts[#back] = context
  else
    back[#back + 1] = book
    back_lookup[#back_lookup + 1] = #back
  end
end

local function event(r, action, status, books, skipped, reason)
  events[#events + 1] = {'request_id', r.id, 'action', action, 'user_id', r.user, 'status', status,
    'books', books, 'skipped', skipped, 'reason', reason}
end

for n, r in ipairs(records) do
  if not mine(r) then
    results[n] = 0
    if r.kind == 'L' and (#r.new > 0 or #r.held > 0) then
      if pending_any == nil then pending_any = pending_on(KEYS[1], ARGV[4], ARGV[5], nil) end
      if pending_any[r.id] then
        -- Another consumer works on it: hand it our grants through the reservation.
        for _, list in ipairs({r.new, r.held}) do
          for _, book in ipairs(list) do
            redis.call('SADD', r.reservation, book)
            redis.call('HSET', KEYS[7], book, r.id)
          end
        end
      else
        for _, book in ipairs(r.new) do
          if redis.call('HEXISTS', KEYS[7], book) == 0 then
            back[#back + 1] = book
            back_contexts[#back] = r.id
          end
        end
      end
    end
  elseif r.kind == 'X' then
    results[n] = 1
    acks[r.action][#acks[r.action] + 1] = r.id
    event(r, r.action, 'rejected', '', '', r.reason)
  elseif r.kind == 'L' then
    results[n] = 1
    acks.lend[#acks.lend + 1] = r.id
    if #r.stored > 0 then reservations_done[#reservations_done + 1] = r.reservation end
    if r.status == 'accepted' then
      local count = 0
      for _, list in ipairs({r.stored, r.new, r.held}) do
        for _, book in ipairs(list) do
          lent_pairs[#lent_pairs + 1] = book
          lent_pairs[#lent_pairs + 1] = r.user
          count = count + 1
        end
      end
      for _, list in ipairs({r.new, r.held}) do
        for _, book in ipairs(list) do
          taken_pairs[#taken_pairs + 1] = book
          taken_pairs[#taken_pairs + 1] = r.id
        end
      end
      add_delta(r.count, count)
    else
      for _, book in ipairs(r.stored) do give_back(book, nil) end
      for _, list in ipairs({r.new, r.held}) do
        for _, book in ipairs(list) do give_back(book, r.id) end
      end
    end
    event(r, 'lend', r.status, r.books, r.skipped, r.reason)
  else -- 'T'
    results[n] = 1
    acks['return'][#acks['return'] + 1] = r.id
    if r.books ~= '' then
      local count = 0
      for book in string.gmatch(r.books, '[^,]+') do
        unlent[#unlent + 1] = book
        give_back(book, nil)
        count = count + 1
      end
      add_delta(r.count, -count)
      event(r, 'return', 'returned', r.books, r.skipped, '')
    else
      event(r, 'return', 'denied', '', r.skipped, r.reason)
    end
  end
end

-- Write everything.
if #lent_pairs > 0 then redis.call('HSET', KEYS[4], unpack(lent_pairs)) end
if #unlent > 0 then redis.call('HDEL', KEYS[4], unpack(unlent)) end
for _, key in ipairs(delta_keys) do
  if deltas[key] ~= 0 then
    -- A count that reaches zero is deleted: a missing count means zero.
    if redis.call('INCRBY', key, deltas[key]) <= 0 then redis.call('DEL', key) end
  end
end
if #to_storage > 0 then redis.call('SADD', KEYS[5], unpack(to_storage)) end
if #back > 0 then
  if #back_lookup > 0 then
    local wanted = {}
    for k, index in ipairs(back_lookup) do wanted[k] = back[index] end
    local found = redis.call('HMGET', KEYS[7], unpack(wanted))
    for k, index in ipairs(back_lookup) do back_contexts[index] = found[k] or '' end
  end
  redis.call('HDEL', KEYS[7], unpack(back))
  redis.call('XADD', KEYS[6], '*', 'book_ids', table.concat(back, ','), 'context_ids', table.concat(back_contexts, ','))
end
if #taken_pairs > 0 then redis.call('HSET', KEYS[7], unpack(taken_pairs)) end
if #reservations_done > 0 then redis.call('DEL', unpack(reservations_done)) end
if #acks.lend > 0 then redis.call('XACK', KEYS[1], ARGV[1], unpack(acks.lend)) end
if #acks['return'] > 0 then redis.call('XACK', KEYS[2], ARGV[1], unpack(acks['return'])) end
for _, fields in ipairs(events) do redis.call('XADD', KEYS[3], '*', unpack(fields)) end
return results
