// mtparent.js - the Node.js parent of the mitosis end-to-end tests.
//
// usage: node mtparent.js
//
// Before the prepare point it requires a few modules, builds a Map of 200k
// entries, starts a worker thread (worker_threads) that builds state of its
// own, and runs one job on libuv's thread pool (so its threads exist). Then
// it prints "READY <pid>" and stops itself with SIGSTOP: `mitosis prepare
// --pid` takes it there, with every thread (main, worker, the libuv pool,
// V8's platform threads) and their event loops (epoll, eventfd, self-pipes).
//
// After the prepare point (the parent on SIGCONT, every child) it prints
//   ROLE parent|child <pid>
//   CHECK timer ok       a 20 ms timer fires (epoll + timerfd-less timers)
//   CHECK pool ok        a pbkdf2 job on libuv's thread pool returns
//   CHECK worker ok      the worker answers with a digest of its state
//   DIGEST <sha256 hex>  of the Map, the pool's result and the worker's
//   DONE
// and exits 0. A watchdog timer bounds the run: a hang exits 3.
'use strict';
const crypto = require('crypto');
const fs = require('fs');
const path = require('path');
const util = require('util');
const zlib = require('zlib');
const { Worker } = require('worker_threads');

function realPid() {
  return parseInt(fs.readlinkSync('/proc/self'), 10);
}

const m = new Map();
for (let i = 0; i < 200000; i++) {
  m.set('key-' + i, { n: (i * 2654435761) % 4294967296, s: 'v' + (i % 977) });
}

const workerSrc = `
const { parentPort } = require('worker_threads');
const crypto = require('crypto');
const state = [];
for (let i = 0; i < 50000; i++) state.push({ i, sq: i * i, tag: 'w' + (i % 13) });
parentPort.on('message', (msg) => {
  if (msg === 'digest') {
    const h = crypto.createHash('sha256');
    for (const e of state) h.update(e.i + ':' + e.sq + ':' + e.tag + ';');
    parentPort.postMessage(h.digest('hex'));
  }
});
parentPort.postMessage('up');
`;

const pbkdf2 = util.promisify(crypto.pbkdf2);

function mapDigest() {
  const h = crypto.createHash('sha256');
  for (const [k, v] of m) h.update(k + '=' + v.n + '/' + v.s + ';');
  return h.digest('hex');
}

function ask(worker) {
  return new Promise((resolve, reject) => {
    worker.once('message', resolve);
    worker.once('error', reject);
    worker.postMessage('digest');
  });
}

async function main() {
  const worker = new Worker(workerSrc, { eval: true });
  await new Promise((resolve, reject) => {
    worker.once('message', resolve);
    worker.once('error', reject);
  });
  // Start libuv's pool threads and zlib once.
  await pbkdf2('warm', 'salt', 1000, 32, 'sha256');
  zlib.gzipSync(Buffer.from(path.basename(__filename)));

  process.stdout.write('READY ' + realPid() + '\n');
  const parentPid = realPid();
  process.kill(process.pid, 'SIGSTOP');
  // The prepare point: here again in the parent after SIGCONT and in
  // every child.

  const watchdog = setTimeout(() => {
    process.stdout.write('ERROR watchdog: the run did not finish in 30 s\n');
    process.exit(3);
  }, 30000);
  const me = realPid();
  const out = [];
  out.push('ROLE ' + (me === parentPid ? 'parent' : 'child') + ' ' + me);
  const t0 = Date.now();
  await new Promise((resolve) => setTimeout(resolve, 20));
  const dt = Date.now() - t0;
  out.push(dt >= 19 && dt < 10000 ? 'CHECK timer ok' : 'CHECK timer FAIL fired after ' + dt + ' ms');
  const key = await pbkdf2('mitosis', 'salt', 2000, 32, 'sha256');
  out.push('CHECK pool ok');
  const wd = await ask(worker);
  out.push(/^[0-9a-f]{64}$/.test(wd) ? 'CHECK worker ok' : 'CHECK worker FAIL answered ' + wd);
  const h = crypto.createHash('sha256');
  h.update(mapDigest());
  h.update(key.toString('hex'));
  h.update(wd);
  out.push('DIGEST ' + h.digest('hex'));
  out.push('DONE');
  process.stdout.write(out.join('\n') + '\n');
  clearTimeout(watchdog);
  await worker.terminate();
  process.exit(0);
}

main().catch((e) => {
  process.stdout.write('ERROR ' + (e && e.stack ? e.stack : e) + '\n');
  process.exit(2);
});
