#!lua
-- Queue the requests handed in through the inbox. Each submission, its size checked,
-- becomes an entry of its request stream with a server-generated ID, and its sender
-- finds that ID on its receipt. The inbox is how a sender without XADD queues requests:
-- it may only RPUSH there, which can neither remove nor reorder what others queued.
--
-- KEYS[1]  the inbox ({NS}:inbox, a list; the format is lending/domain/submission.py)
-- KEYS[2..] the request streams, in the registry's order
-- ARGV[1]  the prefix of receipt keys ({NS}:receipts:): a receipt is a stream holding one
--          entry, request_id=<entry ID> or error=<why the submission was refused>
-- ARGV[2]  receipt lifetime in milliseconds
-- ARGV[3]  how many submissions to take at most
-- ARGV[4]  the longest user or book id, in bytes
-- ARGV[5]  the most book ids in one submission
-- ARGV[6..] the actions of KEYS[2..], in the same order
--
-- Returns how many submissions it took off the inbox: queued, refused (their receipt
-- says why: out of bounds, or for a request stream that has used up its entry IDs,
-- "STREAMFULL ..."; the other stream's submissions are still queued), or dropped
-- (malformed beyond a nonce to answer to). The full validation
-- stays the service's: this only bounds what can be written, and keeps out control
-- characters (no field of an entry can then be split or forged).
--
-- Failure first: every check and read comes before the first write, an XADD (refused
-- as a whole under OOM); a call that fails changes nothing and the inbox keeps it all.
-- Receipt keys are built here from the nonces: they share the namespace's hash slot.

local MAX_MS = '18446744073709551615-'
local receipts, ttl, batch = ARGV[1], ARGV[2], tonumber(ARGV[3])
local max_id, max_books = tonumber(ARGV[4]), tonumber(ARGV[5])
local stream_of, full = {}, {}
for k = 2, #KEYS do stream_of[ARGV[4 + k]] = KEYS[k] end

-- The five lines of a submission; nil for fewer, the first five and true for more.
local function lines(raw)
  local out, start = {}, 1
  while #out < 5 do
    local nl = string.find(raw, '\n', start, true)
    if not nl then
      out[#out + 1] = string.sub(raw, start)
      return #out == 5 and out or nil
    end
    out[#out + 1] = string.sub(raw, start, nl - 1)
    start = nl + 1
  end
  return out, true
end

-- Why the books field is out of bounds, or nil.
local function books_problem(books)
  if books == '' then return 'book_ids is empty' end
  local count, start = 0, 1
  while true do
    count = count + 1
    if count > max_books then return 'more than ' .. max_books .. ' book ids' end
    local comma = string.find(books, ',', start, true)
    local stop = comma and comma - 1 or #books
    if stop - start + 1 > max_id then return 'a book id is longer than ' .. max_id .. ' bytes' end
    if not comma then return nil end
    start = comma + 1
  end
end

-- {nonce, stream, user, books} to queue, {nonce, reason} to refuse, or nil for a
-- submission without a nonce to answer to.
local function parse(raw)
  local nonce = string.match(string.sub(raw, 1, 80), '^1\n([0-9a-f]+)\n')
  if not nonce or #nonce < 16 or #nonce > 64 then return nil end
  local function refuse(reason) return {nonce = nonce, reason = reason} end
  if #raw > 200 + max_id + max_books * (max_id + 1) then return refuse('submission too large') end
  local parts, extra = lines(raw)
  if not parts or extra then return refuse('malformed submission') end
  local stream = stream_of[parts[3]]
  if not stream then return refuse('unknown action') end
  local user, books = parts[4], parts[5]
  if user == '' then return refuse('user_id is empty') end
  if #user > max_id then return refuse('user_id is longer than ' .. max_id .. ' bytes') end
  if string.find(user, '%c') or string.find(books, '%c') then
    return refuse('control character in user_id or book_ids')
  end
  local problem = books_problem(books)
  if problem then return refuse(problem) end
  if full[stream] then return refuse('STREAMFULL ' .. stream .. ' has used up its entry IDs: no entry can be added') end
  return {nonce = nonce, stream = stream, user = user, books = books}
end

-- Checks and reads.
for k = 2, #KEYS do
  if redis.call('EXISTS', KEYS[k]) == 1 then
    local info = redis.call('XINFO', 'STREAM', KEYS[k])
    for i = 1, #info, 2 do
      if info[i] == 'last-generated-id' and string.find(info[i + 1], MAX_MS, 1, true) == 1 then full[KEYS[k]] = true end
    end
  end
end
local taken = redis.call('LRANGE', KEYS[1], 0, batch - 1)
local plan = {}
for _, raw in ipairs(taken) do
  local submission = parse(raw)
  if submission then
    local receipt = receipts .. submission.nonce
    -- Only a stream is a receipt: a key squatted as anything else gets no answer.
    local kind = redis.call('TYPE', receipt).ok
    if kind == 'none' or kind == 'stream' then submission.receipt = receipt end
    plan[#plan + 1] = submission
  end
end

-- Writes.
for _, s in ipairs(plan) do
  local field, value = 'error', s.reason
  if s.stream then
    field, value = 'request_id', redis.call('XADD', s.stream, '*', 'user_id', s.user, 'book_ids', s.books)
  end
  if s.receipt then
    redis.call('XADD', s.receipt, '*', field, value)
    redis.call('PEXPIRE', s.receipt, ttl)
  end
end
if #taken > 0 then redis.call('LTRIM', KEYS[1], #taken, -1) end
return #taken
