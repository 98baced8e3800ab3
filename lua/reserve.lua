#!lua
-- Read and reserve for a batch, in one call, after WATCH on the batch's user counts:
-- take from automated storage the books of its lend requests, and read what the
-- decisions depend on (the users' counts, the holders of the books being returned).
--
-- KEYS[1]  lend request stream ({NS}:lend-requests)
-- KEYS[2]  lent-books hash ({NS}:lent-books)
-- KEYS[3]  automated storage set ({NS}:storage)
-- KEYS[3+i] the reservation set of the i-th lend request ({NS}:reservations:<request_id>)
-- KEYS[4+R..] user count keys ({NS}:user:<user_id>:count) to read
-- ARGV[1]  consumer group
-- ARGV[2]  consumer (this worker)
-- ARGV[3], ARGV[4]  the lowest and highest lend entry id of the batch ('' if none)
-- ARGV[5]  R, the number of lend requests
-- then, per lend request: entry id, 1 if an earlier delivery may have reserved books
--          (look in its reservation first) else 0, N, and its N book ids
-- then the book ids whose holders to read (the books of return requests)
--
-- Returns {codes, counts, holders}. codes: one string per lend request: "" when the
-- entry is no longer pending on this consumer (it was taken over or finished:
-- reserve nothing), else one character per book: "0" lent to someone (skip it),
-- "1" reserved for this request (now or by an earlier attempt), "2" not here (ask
-- the shelving service). counts: each count key's value ('' when missing). holders:
-- each book's holder ('' when not lent). The ownership check and the moves are one
-- atomic step, so nothing is added to the reservation of a request that another
-- worker owns or has finished.
local r_count = tonumber(ARGV[5])
local requests, books = {}, {}
local i = 6
for _ = 1, r_count do
  local n = tonumber(ARGV[i + 2])
  requests[#requests + 1] = {id = ARGV[i], retry = ARGV[i + 1] == '1', first = #books + 1, n = n}
  for j = i + 3, i + 2 + n do books[#books + 1] = ARGV[j] end
  i = i + 3 + n
end

local codes = {}
if #books > 0 then
  local mine = {}
  for _, entry in ipairs(redis.call('XPENDING', KEYS[1], ARGV[1], ARGV[3], ARGV[4], 1000000, ARGV[2])) do
    mine[entry[1]] = true
  end
  local owners = redis.call('HMGET', KEYS[2], unpack(books))
  local stored = redis.call('SMISMEMBER', KEYS[3], unpack(books))
  for r, request in ipairs(requests) do
    local out = {}
    if mine[request.id] then
      local reservation = KEYS[3 + r]
      for j = request.first, request.first + request.n - 1 do
        local book = books[j]
        if owners[j] then
          out[#out + 1] = '0'
        elseif (request.retry and redis.call('SISMEMBER', reservation, book) == 1)
            or (stored[j] == 1 and redis.call('SMOVE', KEYS[3], reservation, book) == 1) then
          out[#out + 1] = '1'
        else
          out[#out + 1] = '2'
        end
      end
    end
    codes[r] = table.concat(out)
  end
else
  for r = 1, r_count do codes[r] = '' end
end

local counts = {}
if #KEYS > 3 + r_count then
  for k, count in ipairs(redis.call('MGET', unpack(KEYS, 4 + r_count))) do counts[k] = count or '' end
end
local holders = {}
if #ARGV >= i then
  for k, holder in ipairs(redis.call('HMGET', KEYS[2], unpack(ARGV, i))) do holders[k] = holder or '' end
end
return {codes, counts, holders}
