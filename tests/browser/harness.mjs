// Shared by the browser tests: start a real dangjian on port 0 in a fresh data directory, and
// Debian's Chromium through playwright-core.
import { spawn, execFileSync } from 'node:child_process';
import { mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { chromium } from 'playwright-core';

export const ADMIN_PASSWORD = 'browser-admin-pass';

export async function startServer(env = {}) {
  const bin = process.env.DJTEST_BIN ?? new URL('../../target/debug/dangjian', import.meta.url).pathname;
  const dir = mkdtempSync(join(tmpdir(), 'dangjian-browser-'));
  const proc = spawn(bin, ['serve', '--http', '127.0.0.1:0', '--rtc-udp', '127.0.0.1:0', '--data', dir], {
    env: { ...process.env, DANGJIAN_ADMIN_PASSWORD: ADMIN_PASSWORD, ...env },
    stdio: ['ignore', 'pipe', 'pipe'],
  });
  let stderr = '';
  proc.stderr.on('data', (d) => { stderr += d; if (process.env.DJTEST_STDERR) process.stderr.write(d); });
  const url = await new Promise((resolve, reject) => {
    const timer = setTimeout(() => reject(new Error(`server did not start in 30 s:\n${stderr}`)), 30_000);
    let out = '';
    proc.stdout.on('data', (d) => {
      out += d;
      const m = out.match(/listening on (http:\/\/\S+)/);
      if (m) { clearTimeout(timer); resolve(m[1]); }
    });
    proc.on('exit', (code) => { clearTimeout(timer); reject(new Error(`server exited ${code}:\n${stderr}`)); });
  });
  return {
    url,
    dir,
    /** A media access token signed with this server's key, from `dangjian token`. */
    token(room, identity, { name = identity, grant = 'publish,subscribe,data' } = {}) {
      grant ??= 'publish,subscribe,data';
      const out = execFileSync(bin, ['token', '--data', dir, '--room', room, '--identity', identity, '--name', name, '--grant', grant]);
      return out.toString().trim();
    },
    async stop() {
      const exited = new Promise((r) => proc.once('exit', r));
      proc.kill('SIGTERM');
      await exited;
      rmSync(dir, { recursive: true, force: true });
    },
  };
}

export async function launchBrowser() {
  return chromium.launch({
    executablePath: process.env.CHROMIUM ?? '/usr/bin/chromium',
    headless: true,
    args: [
      '--no-sandbox', '--disable-gpu', '--disable-background-networking', '--disable-component-update',
      '--disable-sync', '--no-first-run', '--disable-quic',
      '--use-fake-device-for-media-stream', '--use-fake-ui-for-media-stream',
      '--allow-loopback-in-peer-connection',
    ],
  });
}

/**
 * A TCP relay in front of the server whose line can be cut: every open connection is dropped and
 * new ones are refused until it is restored, as when a phone loses its network.
 */
export async function startRelay(targetUrl) {
  const net = await import('node:net');
  const target = new URL(targetUrl);
  const sockets = new Set();
  let cut = false;
  const server = net.createServer((client) => {
    if (cut) return client.destroy();
    const upstream = net.connect(Number(target.port), target.hostname);
    for (const s of [client, upstream]) {
      sockets.add(s);
      s.on('close', () => sockets.delete(s));
      s.on('error', () => {});
    }
    client.pipe(upstream);
    upstream.pipe(client);
    client.on('close', () => upstream.destroy());
    upstream.on('close', () => client.destroy());
  });
  await new Promise((r) => server.listen(0, '127.0.0.1', r));
  return {
    url: `http://127.0.0.1:${server.address().port}`,
    cut() {
      cut = true;
      for (const s of sockets) s.destroy();
    },
    restore() { cut = false; },
    close() { for (const s of sockets) s.destroy(); server.close(); },
  };
}
