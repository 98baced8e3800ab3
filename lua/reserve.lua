-- Reserve from automated storage the books of a batch of lend requests, in one call.
--
-- KEYS[1]  lend request stream ({NS}:lend-requests)
-- KEYS[2]  lent-books hash ({NS}:lent-books)
-- KEYS[3]  automated storage set ({NS}:storage)
-- KEYS[3+i] the reservation set of the i-th request ({NS}:reservations:<request_id>)
-- ARGV[1]  consumer group
-- ARGV[2]  consumer (this worker)
-- ARGV[3], ARGV[4]  the lowest and highest request entry id of the batch
-- then, per request: entry id, 1 if an earlier delivery may have reserved books
--          (look in its reservation first) else 0, N, and its N book ids
--
-- Returns one string per request: "" when the entry is no longer pending on this
-- consumer (it was taken over or finished: reserve nothing), else one character per
-- book: "0" lent to someone (skip it), "1" reserved for this request (now or by an
-- earlier attempt), "2" not here (ask the shelving service). The ownership check
-- and the moves are one atomic step, so nothing is added to the reservation of a
-- request that another worker owns or has finished.
local mine = {}
for _, entry in ipairs(redis.call('XPENDING', KEYS[1], ARGV[1], ARGV[3], ARGV[4], 1000000, ARGV[2])) do
  mine[entry[1]] = true
end

local requests, books = {}, {}
local i = 5
while i <= #ARGV do
  local n = tonumber(ARGV[i + 2])
  requests[#requests + 1] = {id = ARGV[i], retry = ARGV[i + 1] == '1', first = #books + 1, n = n}
  for j = i + 3, i + 2 + n do books[#books + 1] = ARGV[j] end
  i = i + 3 + n
end
if #books == 0 then return {} end

local owners = redis.call('HMGET', KEYS[2], unpack(books))
local stored = redis.call('SMISMEMBER', KEYS[3], unpack(books))
local out = {}
for r, request in ipairs(requests) do
  local codes = {}
  if mine[request.id] then
    local reservation = KEYS[3 + r]
    for j = request.first, request.first + request.n - 1 do
      local book = books[j]
      if owners[j] then
        codes[#codes + 1] = '0'
      elseif (request.retry and redis.call('SISMEMBER', reservation, book) == 1)
          or (stored[j] == 1 and redis.call('SMOVE', KEYS[3], reservation, book) == 1) then
        codes[#codes + 1] = '1'
      else
        codes[#codes + 1] = '2'
      end
    end
  end
  out[r] = table.concat(codes)
end
return out
