// The ingest benchmark's "old design" baseline (bench/ingest.py): the old Node system's webhook
// route, reduced to what it did per POST. Read the body, JSON.parse it (400 on bad JSON), check
// X-Hub-Signature-256 (HMAC-SHA256 of the raw body with APP_SECRET, 401 on mismatch), add it as
// one job to the BullMQ queue `meta-webhooks` on Redis, and answer 200 once `queue.add` resolved
// (503 if it failed). No envelope validation, no split into records, no per-POST log line.
//
//   PORT=8080 REDIS_URL=redis://127.0.0.1:6379 APP_SECRET=... node server.js

'use strict';

const crypto = require('node:crypto');
const http = require('node:http');
const { Queue } = require('bullmq');
const { Redis } = require('ioredis');

const PORT = Number(process.env.PORT || 8080);
const REDIS_URL = process.env.REDIS_URL || 'redis://127.0.0.1:6379';
const APP_SECRET = process.env.APP_SECRET || '';
const MAX_BODY = 1024 * 1024; // the old route's body-parser limit was of this order
const ROUTE = /^\/webhooks\/meta\/([^/?#]+)\/?(?:\?.*)?$/;

const ACCEPTED = JSON.stringify({ status: 'accepted' });

// Fail fast when Redis is away (answer 503) rather than hold the POST in ioredis's offline queue.
const connection = new Redis(REDIS_URL, { enableOfflineQueue: false, maxRetriesPerRequest: 1 });
connection.on('error', (err) => console.error(`redis: ${err.message}`));
const queue = new Queue('meta-webhooks', { connection });
queue.on('error', (err) => console.error(`queue: ${err.message}`));

function reply(res, status, body) {
  res.writeHead(status, {
    'Content-Type': 'application/json',
    'Content-Length': Buffer.byteLength(body),
  });
  res.end(body);
}

function signatureOk(raw, header) {
  if (typeof header !== 'string' || !header.startsWith('sha256=')) return false;
  const expected = Buffer.from(
    'sha256=' + crypto.createHmac('sha256', APP_SECRET).update(raw).digest('hex'),
  );
  const given = Buffer.from(header);
  return given.length === expected.length && crypto.timingSafeEqual(given, expected);
}

async function receive(req, res, slug) {
  const chunks = [];
  let size = 0;
  for await (const chunk of req) {
    size += chunk.length;
    if (size > MAX_BODY) return reply(res, 413, JSON.stringify({ error: 'payload_too_large' }));
    chunks.push(chunk);
  }
  const raw = Buffer.concat(chunks);
  let parsed;
  try {
    parsed = JSON.parse(raw.toString('utf8'));
  } catch {
    return reply(res, 400, JSON.stringify({ error: 'invalid_json' }));
  }
  if (!signatureOk(raw, req.headers['x-hub-signature-256'])) {
    return reply(res, 401, JSON.stringify({ error: 'invalid_signature' }));
  }
  try {
    await queue.add('webhook', { slug, body: parsed, receivedAt: new Date().toISOString() });
  } catch (err) {
    console.error(`queue.add failed: ${err.message}`);
    return reply(res, 503, JSON.stringify({ error: 'queue_unavailable' }));
  }
  return reply(res, 200, ACCEPTED);
}

const server = http.createServer((req, res) => {
  const match = req.method === 'POST' ? ROUTE.exec(req.url) : null;
  if (match) {
    receive(req, res, decodeURIComponent(match[1])).catch((err) => {
      console.error(`request failed: ${err.message}`);
      if (!res.headersSent) reply(res, 500, JSON.stringify({ error: 'internal' }));
    });
    return;
  }
  if (req.method === 'GET' && (req.url === '/health' || req.url.startsWith('/health?'))) {
    return reply(res, 200, JSON.stringify({ status: 'ok' }));
  }
  req.resume();
  reply(res, 404, JSON.stringify({ error: 'not_found' }));
});

async function main() {
  await queue.waitUntilReady(); // /health answers only once the queue can take jobs
  server.listen(PORT, '127.0.0.1', () => console.log(`old-design listening on ${PORT}`));
}

let stopping = false;
async function stop() {
  if (stopping) return;
  stopping = true;
  server.close();
  server.closeAllConnections();
  try {
    await queue.close();
    await connection.quit();
  } catch (err) {
    console.error(`close: ${err.message}`);
  }
  process.exit(0);
}

process.on('SIGTERM', stop);
process.on('SIGINT', stop);

main().catch((err) => {
  console.error(`start failed: ${err.message}`);
  process.exit(1);
});
