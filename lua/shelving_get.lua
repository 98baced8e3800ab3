#!lua
-- Shelving service mock: hand out books to contexts (lend request ids), idempotently.
-- One call serves many get_book(book_id, context_id) questions.
--
-- KEYS[1]  shelving state hash ({NS}:shelving:state): book id -> context id
-- KEYS[2]  the library's grants ledger ({NS}:grants): book id -> context id
-- ARGV     pairs: book id, context id, book id, context id, ...
--
-- Returns one code per pair: 1 handed out to that context now, 2 already handed to
-- that same context (an idempotent repeat), 0 held by another context.
--
-- Every hand-out is written to the grants ledger in the same atomic step as the
-- shelving state: no book leaves the shelves without a record that somebody must
-- settle (lend, store or give it back). A remote shelving service gives the same
-- guarantee through its hand-out log, which the library would fold into the ledger.
local books = {}
for i = 1, #ARGV, 2 do books[#books + 1] = ARGV[i] end
local holders = redis.call('HMGET', KEYS[1], unpack(books))
local codes, handed = {}, {}
for k, book in ipairs(books) do
  local context = ARGV[2 * k]
  local holder = holders[k] or handed[book]
  if not holder then
    handed[book] = context
    codes[k] = 1
  elseif holder == context then
    codes[k] = 2
  else
    codes[k] = 0
  end
end
local pairs_to_set = {}
for k, book in ipairs(books) do
  if codes[k] == 1 then
    pairs_to_set[#pairs_to_set + 1] = book
    pairs_to_set[#pairs_to_set + 1] = ARGV[2 * k]
  end
end
if #pairs_to_set > 0 then
  -- The ledger first: should the second write fail, a record without a hand-out is
  -- harmless (its give-back changes nothing), a hand-out without a record is not.
  redis.call('HSET', KEYS[2], unpack(pairs_to_set))
  redis.call('HSET', KEYS[1], unpack(pairs_to_set))
end
return codes
