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
  proc.stderr.on('data', (d) => { stderr += d; });
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
