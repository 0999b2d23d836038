// Members meet in a room: each browser decodes the others' video (read from getStats, not just a
// <video> element present), and the participant lists follow joins and leaves.
import { test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import { startServer, launchBrowser, startRelay } from './harness.mjs';

let server;
let browser;

before(async () => {
  server = await startServer();
  browser = await launchBrowser();
});

after(async () => {
  await browser?.close();
  await server?.stop();
});

async function join(room, identity, name, base = server.url, viewport = { width: 390, height: 844 }, grant = undefined, query = '') {
  const context = await browser.newContext({ viewport });
  const page = await context.newPage();
  await page.goto(`${base}/room/${room}?token=${server.token(room, identity, { name, grant })}${query}`);
  await page.getByRole('button', { name: '加入会议' }).click();
  await page.locator('#meeting').waitFor();
  // The page shows the meeting before the server's welcome creates its peer connections.
  await page.waitForFunction(() => window.__room.pub && window.__room.sub);
  return { page, context };
}

/** Frames of remote video this page has decoded, per inbound track, from the browser's own stats. */
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

async function waitFor(what, fn, timeoutMs = 20_000) {
  const end = Date.now() + timeoutMs;
  let last;
  while (Date.now() < end) {
    last = await fn();
    if (last) return last;
    await new Promise((r) => setTimeout(r, 250));
  }
  throw new Error(`timed out waiting for ${what} (last: ${JSON.stringify(last)})`);
}

async function peopleList(page) {
  return page.locator('#people-list li').evaluateAll((lis) => lis.map((li) => li.dataset.identity).sort());
}

test('two members see each other, a third comes and goes', async () => {
  const a = await join('branch-1', 'alice', '张三');
  const b = await join('branch-1', 'bob', '李四');

  for (const [who, p] of [['alice', a.page], ['bob', b.page]]) {
    const frames = await waitFor(`${who} decoding the other's video`, async () => {
      const f = await framesDecoded(p);
      return f.some((n) => n > 10) && f;
    });
    assert.ok(frames.some((n) => n > 10), `${who} decoded ${frames}`);
  }
  // Audio flows too.
  const audio = await a.page.evaluate(async () => {
    let packets = 0;
    (await window.__room.sub.getStats()).forEach((s) => { if (s.type === 'inbound-rtp' && s.kind === 'audio') packets += s.packetsReceived; });
    return packets;
  });
  assert.ok(audio > 0, 'alice receives bob\'s audio');
  // The server protected that media itself (its forwarding fast path found Chromium's SRTP key),
  // rather than falling back to the WebRTC engine's send pipeline.
  const metrics = await (await fetch(`${server.url}/metrics`)).text();
  const counter = (name) => Number(metrics.match(new RegExp(`^${name} (\\d+)$`, 'm'))?.[1]);
  assert.ok(counter('dangjian_sfu_fast_path_connections_total') >= 2, metrics);
  assert.equal(counter('dangjian_sfu_rtc_path_connections_total'), 0);
  // And it opened Chromium's media itself (its receive fast path found the remote key), with
  // nothing refused.
  assert.ok(counter('dangjian_sfu_receive_fast_path_connections_total') >= 2, metrics);
  assert.equal(counter('dangjian_sfu_rejected_srtp_total'), 0, metrics);
  // Chromium's fake microphone beeps: the server names bob as a speaker, and his tile lights up.
  await waitFor('alice told that bob speaks', () => a.page.evaluate(() => window.__room.speakersSeen.has('bob')));

  assert.deepEqual(await peopleList(a.page), ['alice', 'bob']);
  const c = await join('branch-1', 'carol', '王五');
  await waitFor('alice sees carol', async () => (await peopleList(a.page)).length === 3);
  await waitFor('bob sees carol', async () => (await peopleList(b.page)).length === 3);
  await c.page.getByRole('button', { name: '离开' }).click();
  await waitFor('alice sees carol leave', async () => (await peopleList(a.page)).join() === 'alice,bob');
  await waitFor('bob sees carol leave', async () => (await peopleList(b.page)).join() === 'alice,bob');
  await Promise.all([a.context.close(), b.context.close(), c.context.close()]);
});

/** Inbound video tracks this page decodes: how many have decoded more than `min` frames. */
async function decodingTracks(page, min) {
  return (await framesDecoded(page)).filter((n) => n > min).length;
}

/** Codec of each inbound video track whose decoded-frame count rose over the last second. */
async function decodingCodecs(page) {
  const sample = () => page.evaluate(async () => {
    const stats = await window.__room.sub.getStats();
    const out = {};
    stats.forEach((s) => {
      if (s.type === 'inbound-rtp' && s.kind === 'video') out[s.id] = [s.framesDecoded ?? 0, stats.get(s.codecId)?.mimeType];
    });
    return out;
  });
  const before = await sample();
  await new Promise((r) => setTimeout(r, 1000));
  const after = await sample();
  return Object.entries(after).filter(([id, [n]]) => n > (before[id]?.[0] ?? 0)).map(([, [, mime]]) => mime).sort();
}

test('video goes as H.264 while everyone can decode it, VP8 when someone cannot', async () => {
  const a = await join('branch-6', 'alice', '张三');
  const b = await join('branch-6', 'bob', '李四');
  for (const [who, p] of [['alice', a.page], ['bob', b.page]]) {
    await waitFor(`${who} decoding H.264`, async () => {
      const codecs = await decodingCodecs(p);
      return codecs.join() === 'video/H264' && codecs;
    }, 30_000);
  }
  // Carol's browser says it can only do VP8: everyone switches.
  const c = await join('branch-6', 'carol', '王五', server.url, undefined, undefined, '&codecs=vp8');
  for (const [who, p] of [['alice', a.page], ['bob', b.page], ['carol', c.page]]) {
    await waitFor(`${who} decoding the two others as VP8`, async () => {
      const codecs = await decodingCodecs(p);
      return codecs.join() === 'video/VP8,video/VP8' && codecs;
    }, 40_000);
  }
  const errors = await Promise.all([a, b, c].map(({ page }) => page.evaluate(() => window.__room.events.filter((e) => e === 'error').length)));
  assert.deepEqual(errors, [0, 0, 0], 'no signaling errors');
  await Promise.all([a.context.close(), b.context.close(), c.context.close()]);
});

test('a shared screen reaches the others', async () => {
  const a = await join('branch-2', 'alice', '张三');
  const b = await join('branch-2', 'bob', '李四');
  await waitFor('bob decoding alice\'s camera', async () => (await decodingTracks(b.page, 5)) >= 1);
  await a.page.getByRole('button', { name: '共享屏幕' }).click();
  await waitFor('bob seeing alice\'s screen tile', async () => (await b.page.locator('.tile.screen').count()) === 1);
  await waitFor('bob decoding camera and screen', async () => (await decodingTracks(b.page, 5)) >= 2);
  // Stopping the share removes it for the others.
  await a.page.getByRole('button', { name: '共享屏幕' }).click();
  await waitFor('the screen tile going away', async () => (await b.page.locator('.tile.screen').count()) === 0);
  await Promise.all([a.context.close(), b.context.close()]);
});

test('a member cut off for 5 s comes back without the others seeing a leave', async () => {
  const relay = await startRelay(server.url);
  const a = await join('branch-3', 'alice', '张三');
  const b = await join('branch-3', 'bob', '李四', relay.url);
  await waitFor('alice decoding bob', async () => (await decodingTracks(a.page, 5)) >= 1);
  const before = await a.page.evaluate(() => window.__room.events.length);

  relay.cut();
  await waitFor('bob noticing the cut', () => b.page.locator('#banner').isVisible());
  await new Promise((r) => setTimeout(r, 5000));
  relay.restore();

  await waitFor('bob back in the room', () => b.page.evaluate(() => window.__room.events.filter((e) => e === 'joined').length === 2));
  await waitFor('bob\'s banner clearing', async () => !(await b.page.locator('#banner').isVisible()));
  // Bob's new tracks reach alice and decode again: her decoded-frame count keeps rising.
  await waitFor('alice decoding bob after the cut', async () => {
    const total = async () => (await framesDecoded(a.page)).reduce((x, y) => x + y, 0);
    const t0 = await total();
    await new Promise((r) => setTimeout(r, 1000));
    return (await total()) - t0 > 5;
  }, 30_000);
  const after = await a.page.evaluate((n) => window.__room.events.slice(n), before);
  assert.ok(!after.includes('participant_left'), `alice saw no leave: ${after}`);
  assert.ok(!after.includes('participant_joined'), `nor a second join: ${after}`);
  assert.deepEqual(await peopleList(a.page), ['alice', 'bob']);
  await Promise.all([a.context.close(), b.context.close()]);
  relay.close();
});

/** Width of the remote video this page decodes (the simulcast layer it gets). */
async function decodedWidth(page) {
  return page.evaluate(async () => {
    let width = 0;
    (await window.__room.sub.getStats()).forEach((s) => {
      if (s.type === 'inbound-rtp' && s.kind === 'video' && (s.framesDecoded ?? 0) > 0) width = Math.max(width, s.frameWidth ?? 0);
    });
    return width;
  });
}

test('each viewer gets the simulcast layer that fits its screen', async () => {
  const desktop = { width: 1600, height: 900 };
  const a = await join('branch-4', 'alice', '张三', server.url, desktop);
  // Only alice publishes: three encoders on two cores would starve each other.
  const b = await join('branch-4', 'bob', '李四', server.url, desktop, 'subscribe');
  const c = await join('branch-4', 'carol', '王五', server.url, undefined, 'subscribe');
  const publishes = await waitFor('alice sending two layers', () => a.page.evaluate(async () => {
    const layers = [];
    (await window.__room.pub.getStats()).forEach((s) => {
      if (s.type === 'outbound-rtp' && s.kind === 'video' && s.bytesSent > 0) layers.push(s.frameWidth);
    });
    return layers.length >= 2 && layers;
  }));
  // The encoder may shrink every layer when the machine is busy, so compare the two viewers
  // rather than expect fixed sizes: the desktop gets the larger layer, the phone the smaller.
  const [big, small] = await waitFor('desktop and phone on different layers', async () => {
    const [b1, c1] = [await decodedWidth(b.page), await decodedWidth(c.page)];
    return c1 > 0 && b1 > c1 && [b1, c1];
  }, 40_000);
  assert.ok(big > small, `desktop ${big} px, phone ${small} px (alice sends ${publishes})`);
  // Chromium's own bandwidth estimate, which lets it send the larger layers at all, rests on the
  // server's transport-wide feedback: it has grown to twice its 300 kb/s start. (On a busy machine
  // Chromium may grow it only by 8 % a second, so ask no more than that; without the feedback it
  // does not even send the second layer.)
  const estimate = await waitFor('alice\'s send estimate above 600 kb/s', () => a.page.evaluate(async () => {
    let bps = 0;
    (await window.__room.pub.getStats()).forEach((s) => {
      if (s.type === 'candidate-pair' && s.nominated) bps = Math.max(bps, s.availableOutgoingBitrate || 0);
    });
    return bps > 600_000 && bps;
  }), 30_000);
  console.log(`alice's send estimate ${Math.round(estimate / 1000)} kb/s`);
  // With the desktop viewer gone nobody watches the larger layers: alice stops encoding them.
  await b.context.close();
  const paused = await waitFor('alice pausing the unwatched layers', () => a.page.evaluate(async () => {
    const layers = {};
    (await window.__room.pub.getStats()).forEach((s) => {
      if (s.type === 'outbound-rtp' && s.kind === 'video') layers[s.rid] = s.active;
    });
    return layers.q === true && layers.h === false && layers.f === false && layers;
  }), 40_000);
  assert.deepEqual(paused, { q: true, h: false, f: false });
  await Promise.all([a.context.close(), c.context.close()]);
});

test('media gets through over ICE-TCP when UDP cannot', async () => {
  // A server whose advertised UDP address reaches nothing (its socket listens on 127.0.0.1, the
  // candidate says 127.0.0.2), as when a firewall drops UDP: only the TCP candidate can work.
  const blocked = await startServer({ DANGJIAN_RTC_PUBLIC_IP: '127.0.0.2', DANGJIAN_RTC_TCP: '127.0.0.2:0' });
  const open = async (identity) => {
    const context = await browser.newContext({ viewport: { width: 390, height: 844 } });
    const page = await context.newPage();
    await page.goto(`${blocked.url}/room/branch-5?token=${blocked.token('branch-5', identity)}`);
    await page.getByRole('button', { name: '加入会议' }).click();
    return { page, context };
  };
  try {
    const a = await open('alice');
    const b = await open('bob');
    await waitFor('bob decoding alice over TCP', async () => (await decodingTracks(b.page, 5)) >= 1, 30_000);
    await waitFor('alice decoding bob over TCP', async () => (await decodingTracks(a.page, 5)) >= 1, 30_000);
    const protocol = await b.page.evaluate(async () => {
      const stats = await window.__room.sub.getStats();
      let pair;
      stats.forEach((s) => { if (s.type === 'candidate-pair' && s.nominated && s.state === 'succeeded') pair = s; });
      return pair && stats.get(pair.remoteCandidateId)?.protocol;
    });
    assert.equal(protocol, 'tcp', 'media went over TCP');
    await Promise.all([a.context.close(), b.context.close()]);
  } finally {
    await blocked.stop();
  }
});
