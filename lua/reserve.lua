-- Reserve a lend request's books from automated storage, in one round trip.
--
-- KEYS[1]  request stream ({NS}:lend-requests)
-- KEYS[2]  lent-books hash ({NS}:lent-books)
-- KEYS[3]  automated storage set ({NS}:storage)
-- KEYS[4]  this request's reservation set ({NS}:reservations:<request_id>)
-- ARGV[1]  consumer group
-- ARGV[2]  request entry id
-- ARGV[3..] book ids, duplicates already removed
--
-- Returns -1 when the entry is no longer pending (another worker finished it: reserve
-- nothing), else one code per book: 0 lent to someone (skip it), 1 reserved for this
-- request (now or by an earlier attempt), 2 not here (ask the shelving service).
-- The pending check and the moves are one atomic step, so nothing is ever added to a
-- reservation whose request has already been finished.
if #redis.call('XPENDING', KEYS[1], ARGV[1], ARGV[2], ARGV[2], 1) == 0 then
  return -1
end
local codes = {}
for i = 3, #ARGV do
  local book = ARGV[i]
  if redis.call('HEXISTS', KEYS[2], book) == 1 then
    codes[#codes + 1] = 0
  elseif redis.call('SISMEMBER', KEYS[4], book) == 1
      or redis.call('SMOVE', KEYS[3], KEYS[4], book) == 1 then
    codes[#codes + 1] = 1
  else
    codes[#codes + 1] = 2
  end
end
return codes
