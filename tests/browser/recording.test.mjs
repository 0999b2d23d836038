// A meeting recorded from two browsers is replayed from S3, seeked and commented on a phone-sized browser.
//
// Two signed-in users (the admin, who may record, and a plain member) meet in a room; the admin
// starts and stops the recording with the room's own button, both see the "录制中" badge; the
// catalogue turns the capture into a replay; the member, once it is published, opens the replay
// link on a phone: the MP4 plays, seeks (HTTP Range), shows real pictures, and takes a comment.
import { test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import { startServer, launchBrowser, ADMIN_PASSWORD } from './harness.mjs';

let server;
let browser;

/** The recording goes to the real S3 server (Garage) that scripts/test starts. */
function garage() {
  const url = process.env.DJTEST_S3_URL;
  if (!url) throw new Error('DJTEST_S3_URL is not set: run the tests with scripts/test, which starts Garage');
  return {
    DANGJIAN_STORAGE_URL: url,
    DANGJIAN_S3_ACCESS_KEY_ID: process.env.DJTEST_S3_KEY_ID ?? '',
    DANGJIAN_S3_SECRET_ACCESS_KEY: process.env.DJTEST_S3_SECRET ?? '',
  };
}

before(async () => {
  server = await startServer(garage());
  browser = await launchBrowser();
});

after(async () => {
  await browser?.close();
  await server?.stop();
});

const PHONE = { viewport: { width: 390, height: 844 }, isMobile: true, hasTouch: true, deviceScaleFactor: 3, locale: 'zh-CN' };
const RECORD_FOR_MS = 12_000;

async function waitFor(what, fn, timeoutMs = 20_000, everyMs = 250) {
  const end = Date.now() + timeoutMs;
  let last;
  while (Date.now() < end) {
    last = await fn();
    if (last) return last;
    await new Promise((r) => setTimeout(r, everyMs));
  }
  throw new Error(`timed out waiting for ${what} (last: ${JSON.stringify(last)})`);
}

/** A JSON API call with the context's cookies; throws with the body unless the status is `expect`. */
async function api(context, method, path, data, expect) {
  const resp = await context.request.fetch(server.url + path, { method, data, timeout: 15_000 });
  const text = await resp.text();
  if (expect !== undefined && resp.status() !== expect) {
    throw new Error(`${method} ${path}: ${resp.status()} (expected ${expect}): ${text}`);
  }
  return text ? JSON.parse(text) : null;
}

/** A fresh browser context signed in through the API (the cookie lands in the context). */
async function signedIn(username, password, options = { viewport: { width: 390, height: 844 } }) {
  const context = await browser.newContext(options);
  await api(context, 'POST', '/api/v1/session', { username, password }, 200);
  return context;
}

/** Joins `room` as the context's signed-in user (the page mints the media token itself). */
async function join(context, room) {
  const page = await context.newPage();
  await page.goto(`${server.url}/room/${room}`);
  await page.getByRole('button', { name: '加入会议' }).click();
  await page.locator('#meeting').waitFor({ timeout: 15_000 });
  return page;
}

/** Frames of remote video this page has decoded, per inbound track. */
async function framesDecoded(page) {
  return page.evaluate(async () => {
    const sub = window.__room.sub;
    if (!sub) return [];
    const stats = await sub.getStats();
    const out = [];
    stats.forEach((s) => { if (s.type === 'inbound-rtp' && s.kind === 'video') out.push(s.framesDecoded ?? 0); });
    return out;
  });
}

async function peopleList(page) {
  return page.locator('#people-list li').evaluateAll((lis) => lis.map((li) => li.dataset.identity).sort());
}

test('a meeting recorded from two browsers is replayed, seeked and commented on a phone', { timeout: 240_000 }, async (t) => {
  const room = 'record-1';
  const contexts = [];
  try {
    // The admin creates a plain member (who may join but not record) and both sign in.
    const admin = await signedIn('admin', ADMIN_PASSWORD);
    contexts.push(admin);
    await api(admin, 'POST', '/api/v1/users',
      { username: 'bob', display_name: '李四', password: 'initial-pass-1', role: 'member' }, 201);
    const member = await signedIn('bob', 'initial-pass-1');
    contexts.push(member);
    await api(member, 'PUT', '/api/v1/me/password',
      { current_password: 'initial-pass-1', new_password: 'bob-own-pass-2' }, undefined);
    const me = await api(member, 'GET', '/api/v1/me', undefined, 200);
    assert.equal(me.must_change_password, false, 'bob chose his own password');

    const a = await join(admin, room);
    const b = await join(member, room);
    for (const [who, p] of [['admin', a], ['bob', b]]) {
      await waitFor(`${who} decoding the other's video`, async () => {
        const f = await framesDecoded(p);
        return f.some((n) => n > 10) && f;
      }, 30_000);
    }
    assert.deepEqual(await peopleList(a), ['admin', 'bob']);

    // Only the one allowed to record has the button; nobody is being recorded yet.
    assert.equal(await a.locator('#record-button').isVisible(), true, 'the admin may record');
    assert.equal(await a.locator('#record-button').innerText(), '开始录制');
    assert.equal(await b.locator('#record-button').isVisible(), false, 'a member may not');
    for (const p of [a, b]) assert.equal(await p.locator('#recording').isVisible(), false);

    const startedAt = Date.now();
    await a.locator('#record-button').click();
    for (const [who, p] of [['admin', a], ['bob', b]]) {
      await p.locator('#recording').waitFor({ state: 'visible', timeout: 15_000 })
        .catch((e) => { throw new Error(`${who} never saw the recording badge: ${e.message}`); });
      assert.equal(await p.locator('#recording').innerText(), '● 录制中');
    }
    await waitFor('the button to offer stopping', async () => (await a.locator('#record-button').innerText()) === '停止录制', 5_000);
    // The recorder listens as a hidden participant: the people list does not show it.
    assert.deepEqual(await peopleList(a), ['admin', 'bob']);
    assert.deepEqual(await peopleList(b), ['admin', 'bob']);

    const listed = await api(admin, 'GET', `/api/v1/recordings?room=${room}`, undefined, 200);
    assert.equal(listed.total, 1, JSON.stringify(listed));
    const rec0 = listed.items[0];
    assert.equal(rec0.status, 'recording');
    assert.equal(rec0.room, room);
    const id = rec0.id;

    // Media keeps flowing while recorded.
    await new Promise((r) => setTimeout(r, Math.max(0, RECORD_FOR_MS - (Date.now() - startedAt))));
    const frames = await framesDecoded(b);
    assert.ok(frames.some((n) => n > 100), `bob still decodes the admin (${frames})`);

    await a.locator('#record-button').click();
    for (const [who, p] of [['admin', a], ['bob', b]]) {
      await waitFor(`${who}'s recording badge going away`, async () => !(await p.locator('#recording').isVisible()), 15_000);
    }
    assert.equal(await a.locator('#record-button').innerText(), '开始录制');

    const rec = await waitFor('the replay to be ready', async () => {
      const r = await api(admin, 'GET', `/api/v1/recordings/${id}`, undefined, 200);
      if (r.status === 'failed') throw new Error(`recording failed: ${r.failure}`);
      return r.status === 'ready' && r;
    }, 90_000, 1000);
    assert.equal(rec.media_url, `/api/v1/recordings/${id}/media`);
    assert.ok(rec.duration_ms >= 8_000 && rec.duration_ms <= RECORD_FOR_MS + 10_000, `duration ${rec.duration_ms} ms`);
    assert.ok(rec.size_bytes > 0, `size ${rec.size_bytes}`);
    const recorded = new Set(rec.tracks.map((t) => `${t.participant}/${t.kind}`));
    for (const t of ['admin/video', 'bob/video', 'admin/audio', 'bob/audio']) {
      assert.ok(recorded.has(t), `the replay has ${t}: ${JSON.stringify(rec.tracks)}`);
    }
    await Promise.all([a.close(), b.close()]);

    // A member may watch once it is published.
    await api(admin, 'PATCH', `/api/v1/recordings/${id}`, { published: true }, 200);

    // Bob opens the replay link on his phone, signs in, and lands on the replay.
    const phone = await browser.newContext(PHONE);
    contexts.push(phone);
    const page = await phone.newPage();
    await page.goto(`${server.url}/recordings/${id}`);
    await page.waitForURL(/\/login\?next=/, { timeout: 10_000 });
    await page.getByLabel('用户名').fill('bob');
    await page.getByLabel('密码').fill('bob-own-pass-2');
    await page.getByRole('button', { name: '登录' }).click();
    await page.waitForURL(`${server.url}/recordings/${id}`, { timeout: 10_000 });
    assert.equal(await page.getByTestId('status').innerText(), '可回放');
    const views = Number((await page.getByTestId('views').innerText()).match(/观看\s*(\d+)\s*次/)?.[1]);
    assert.ok(views >= 1, `views shown: ${views}`);
    const overflow = await page.evaluate(() => document.documentElement.scrollWidth > window.innerWidth);
    assert.equal(overflow, false, 'the replay page fits a phone without sideways scrolling');

    const video = page.locator('video#player');
    assert.equal(await video.getAttribute('src'), rec.media_url);
    assert.equal(await video.evaluate((v) => v.hasAttribute('playsinline') && v.controls), true);
    const box = await video.boundingBox();
    assert.ok(box && box.width > 0 && box.width <= 390, `video box ${JSON.stringify(box)}`);

    // Seeking is served by HTTP ranges.
    const range = await page.evaluate(async (url) => {
      const r = await fetch(url, { headers: { Range: 'bytes=0-99' } });
      return { status: r.status, contentRange: r.headers.get('content-range'), type: r.headers.get('content-type'), bytes: (await r.arrayBuffer()).byteLength };
    }, rec.media_url);
    assert.equal(range.status, 206, JSON.stringify(range));
    assert.equal(range.bytes, 100);
    assert.equal(range.type, 'video/mp4');
    assert.match(range.contentRange ?? '', new RegExp(`^bytes 0-99/${rec.size_bytes}$`));

    const meta = await waitFor('the video metadata', () => video.evaluate((v) => v.error
      ? { error: v.error.code, message: v.error.message }
      : v.readyState >= 1 && { duration: v.duration, width: v.videoWidth, height: v.videoHeight }), 20_000);
    assert.ok(!meta.error, `the browser cannot load the replay: ${JSON.stringify(meta)}`);
    assert.ok(Number.isFinite(meta.duration) && meta.duration >= 8, `duration ${meta.duration} s`);
    assert.ok(Math.abs(meta.duration - rec.duration_ms / 1000) <= 2,
      `the video lasts ${meta.duration} s, the catalogue says ${rec.duration_ms} ms`);
    assert.ok(meta.width > 0 && meta.height > 0, `video size ${meta.width}x${meta.height}`);

    // It plays (muted, as a page may start it without a tap).
    const played = await video.evaluate(async (v) => {
      v.muted = true;
      try { await v.play(); return 'ok'; } catch (e) { return String(e); }
    });
    assert.equal(played, 'ok');
    await waitFor('playback to advance', () => video.evaluate((v) => v.currentTime > 1 && v.currentTime), 15_000);

    // Seek to the middle: it lands there and keeps playing.
    const target = Math.round(meta.duration / 2 * 10) / 10;
    const seeked = await video.evaluate((v, t) => new Promise((resolve) => {
      const timer = setTimeout(() => resolve({ timedOut: true, at: v.currentTime }), 15_000);
      v.addEventListener('seeked', () => { clearTimeout(timer); resolve({ at: v.currentTime }); }, { once: true });
      v.currentTime = t;
    }), target);
    assert.ok(!seeked.timedOut, `no seeked event (at ${seeked.at})`);
    assert.ok(Math.abs(seeked.at - target) <= 0.5, `seeked to ${seeked.at}, wanted ${target}`);
    await waitFor('playback to advance after the seek',
      () => video.evaluate((v, t) => !v.paused && v.currentTime > t + 0.5 && v.currentTime, seeked.at), 10_000);

    // What plays is real pictures and sound: frames were presented, audio decoded, and the frame
    // now showing is not a flat colour.
    const quality = await video.evaluate((v) => {
      const q = v.getVideoPlaybackQuality();
      const c = document.createElement('canvas');
      c.width = 64; c.height = 48;
      const g = c.getContext('2d');
      g.drawImage(v, 0, 0, 64, 48);
      const px = g.getImageData(0, 0, 64, 48).data;
      let min = 255, max = 0, sum = 0;
      for (let i = 0; i < px.length; i += 4) {
        const y = 0.299 * px[i] + 0.587 * px[i + 1] + 0.114 * px[i + 2];
        min = Math.min(min, y); max = Math.max(max, y); sum += y;
      }
      return {
        frames: q.totalVideoFrames, dropped: q.droppedVideoFrames,
        audioBytes: /** @type {any} */ (v).webkitAudioDecodedByteCount,
        width: v.videoWidth, height: v.videoHeight,
        lumaMin: Math.round(min), lumaMax: Math.round(max), lumaMean: Math.round(sum / (px.length / 4)),
      };
    });
    assert.ok(quality.width > 0 && quality.height > 0, JSON.stringify(quality));
    assert.ok(quality.frames > 10, `frames presented: ${JSON.stringify(quality)}`);
    assert.ok(quality.audioBytes > 0, `audio decoded: ${JSON.stringify(quality)}`);
    assert.ok(quality.lumaMax - quality.lumaMin > 30, `the picture is not a flat colour: ${JSON.stringify(quality)}`);

    // A comment (学习心得) through the page's form, shown after the redirect back.
    const comment = `学习体会：录像回放清晰 ${Date.now()}`;
    await page.getByLabel('写下学习心得').fill(comment);
    await page.getByRole('button', { name: '发表' }).click();
    await page.waitForURL(`${server.url}/recordings/${id}#comments`, { timeout: 10_000 });
    await page.locator('.comments li').first().waitFor({ timeout: 10_000 });
    const shown = await page.locator('.comments li').evaluateAll((lis) => lis.map((li) => ({
      who: li.querySelector('.who')?.textContent ?? '', body: li.querySelector('.body')?.textContent ?? '',
    })));
    assert.equal(shown.length, 1, JSON.stringify(shown));
    assert.equal(shown[0].body, comment);
    assert.match(shown[0].who, /^李四 · /);
    assert.match(await page.locator('#comments h2').innerText(), /学习心得（1）/);
    const viewsAfter = Number((await page.getByTestId('views').innerText()).match(/观看\s*(\d+)\s*次/)?.[1]);
    assert.ok(viewsAfter >= views, `views ${views} then ${viewsAfter}`);

    const final = await api(admin, 'GET', `/api/v1/recordings/${id}`, undefined, 200);
    assert.equal(final.comments, 1);
    assert.ok(final.views >= 1, `views in the catalogue: ${final.views}`);
    t.diagnostic(`replay ${rec.duration_ms} ms, ${rec.size_bytes} bytes, ${meta.width}x${meta.height}; `
      + `seeked to ${seeked.at.toFixed(2)} of ${meta.duration.toFixed(2)} s; ${JSON.stringify(quality)}; views ${final.views}`);
  } finally {
    await Promise.all(contexts.map((c) => c.close().catch(() => {})));
  }
});
