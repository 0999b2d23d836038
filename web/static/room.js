// The browser room: pre-join, then two peer connections to the SFU (publish and subscribe),
// driven by the JSON protocol of docs/protocol.md over the /rtc WebSocket.
// @ts-check

const app = /** @type {HTMLElement} */ (document.getElementById('app'));
const room = app.dataset.room ?? '';
const token = app.dataset.token ?? '';
const $ = (/** @type {string} */ id) => /** @type {HTMLElement} */ (document.getElementById(id));

const RECONNECT_WINDOW_MS = 30_000;
const SIMULCAST = [
  { rid: 'q', scaleResolutionDownBy: 4, maxBitrate: 150_000 },
  { rid: 'h', scaleResolutionDownBy: 2, maxBitrate: 500_000 },
  { rid: 'f', maxBitrate: 1_500_000 },
];
/** The room's video codec, from the server: H.264 while everyone can decode it. */
let videoCodec = 'vp8';
/** The room is being recorded. */
let recording = false;
/** track id → the quality last asked of the server */
const asked = new Map();

/** @type {WebSocket | null} */ let ws = null;
/** @type {RTCPeerConnection | null} */ let pub = null;
/** @type {RTCPeerConnection | null} */ let sub = null;
/** @type {MediaStream | null} */ let camStream = null;
/** @type {MediaStream | null} */ let screenStream = null;
/** @type {RTCIceServer[]} */ let iceServers = [];
let me = '';
let leaving = false;
let lostAt = 0;
/** @type {Promise<void>} */ let negotiation = Promise.resolve();
/** @type {((sdp: string) => void) | null} */ let pendingAnswer = null;

/** identity → participant info from the server */
const participants = new Map();
/** subscriber-connection mid → { track, participant } */
const midInfo = new Map();
/** published track id → MediaStreamTrack received for it */
const remoteTracks = new Map();
/** our own track id on the server → local source, filled from track_published */
const events = [];
/** everyone the server has named as an active speaker */
const speakersSeen = new Set();

// Tests read what the page really does through this object.
// @ts-ignore
window.__room = { get pub() { return pub; }, get sub() { return sub; }, get ws() { return ws; }, participants, events, remoteTracks, speakersSeen };

function send(/** @type {object} */ msg) {
  if (ws && ws.readyState === WebSocket.OPEN) ws.send(JSON.stringify(msg));
}

// ---------- pre-join ----------

async function prejoin() {
  try {
    camStream = await navigator.mediaDevices.getUserMedia({ audio: true, video: { width: 1280, height: 720 } });
  } catch (e) {
    // Joining without a camera or microphone is allowed: the member can still watch and listen.
    showPrejoinError('无法打开摄像头或麦克风：' + /** @type {Error} */ (e).message);
    camStream = null;
  }
  /** @type {HTMLVideoElement} */ ($('preview')).srcObject = camStream;
  const devices = await navigator.mediaDevices.enumerateDevices();
  fillSelect('camera-select', devices.filter((d) => d.kind === 'videoinput'));
  fillSelect('mic-select', devices.filter((d) => d.kind === 'audioinput'));
  $('camera-select').addEventListener('change', () => switchDevice());
  $('mic-select').addEventListener('change', () => switchDevice());
}

function showPrejoinError(/** @type {string} */ text) {
  const el = $('prejoin-error');
  el.textContent = text;
  el.hidden = false;
}

function fillSelect(/** @type {string} */ id, /** @type {MediaDeviceInfo[]} */ list) {
  const sel = /** @type {HTMLSelectElement} */ ($(id));
  sel.replaceChildren(...list.map((d, i) => new Option(d.label || `设备 ${i + 1}`, d.deviceId)));
}

async function switchDevice() {
  const cam = /** @type {HTMLSelectElement} */ ($('camera-select')).value;
  const mic = /** @type {HTMLSelectElement} */ ($('mic-select')).value;
  camStream?.getTracks().forEach((t) => t.stop());
  camStream = await navigator.mediaDevices.getUserMedia({
    audio: mic ? { deviceId: { exact: mic } } : true,
    video: cam ? { deviceId: { exact: cam }, width: 1280, height: 720 } : true,
  });
  /** @type {HTMLVideoElement} */ ($('preview')).srcObject = camStream;
}

// ---------- codecs ----------

/** What this browser can both send and receive. `?codecs=vp8` on the page overrides it. */
function supportedCodecs() {
  const forced = new URLSearchParams(location.search).get('codecs');
  if (forced) return forced.split(',');
  const h264 = (caps) => (caps?.codecs ?? []).some((c) => c.mimeType.toLowerCase() === 'video/h264' && /packetization-mode=1/.test(c.sdpFmtpLine ?? ''));
  const both = h264(RTCRtpSender.getCapabilities?.('video')) && h264(RTCRtpReceiver.getCapabilities?.('video'));
  return both ? ['h264', 'vp8'] : ['vp8'];
}

/** Puts the room's codec first in a video transceiver's preferences (H.264: the server's profile first). */
function preferCodec(/** @type {RTCRtpTransceiver} */ tr) {
  const caps = RTCRtpReceiver.getCapabilities?.('video')?.codecs;
  if (!caps || !tr.setCodecPreferences) return;
  const want = videoCodec === 'h264' ? 'video/h264' : 'video/vp8';
  const rank = (/** @type {RTCRtpCodec} */ c) => {
    if (c.mimeType.toLowerCase() !== want) return 3;
    if (want === 'video/vp8') return 0;
    const fmtp = c.sdpFmtpLine ?? '';
    return /packetization-mode=1/.test(fmtp) ? (/profile-level-id=42e01f/.test(fmtp) ? 0 : 1) : 2;
  };
  const ordered = [...caps].sort((a, b) => rank(a) - rank(b));
  try {
    tr.setCodecPreferences(ordered);
  } catch (e) {
    console.warn('setCodecPreferences', e);
  }
}

/** The room changed codec: publish each video again so the others can decode it. */
function republishVideo() {
  if (!pub) return;
  for (const tr of pub.getTransceivers()) {
    const track = tr.sender.track;
    if (!track || track.kind !== 'video') continue;
    const source = sourceOf(track);
    const id = ownTrackId(source);
    if (id) send({ type: 'unpublish', track: id });
    pub.removeTrack(tr.sender);
    const camera = source === 'camera' && camStream;
    const next = pub.addTransceiver(track, {
      direction: 'sendonly',
      streams: camera ? [camStream] : [],
      sendEncodings: camera ? SIMULCAST : undefined,
    });
    preferCodec(next);
  }
  renegotiate();
}

// ---------- connection ----------

function join() {
  $('prejoin').hidden = true;
  $('meeting').hidden = false;
  connect();
}

function connect() {
  const proto = location.protocol === 'https:' ? 'wss:' : 'ws:';
  const name = /** @type {HTMLInputElement} */ ($('display-name')).value.trim();
  const url = `${proto}//${location.host}/rtc?access_token=${encodeURIComponent(token)}&name=${encodeURIComponent(name)}`
    + `&codecs=${supportedCodecs().join(',')}`;
  const socket = new WebSocket(url);
  ws = socket;
  socket.onmessage = (ev) => handle(JSON.parse(ev.data)).catch((e) => console.error('room:', e));
  socket.onopen = () => { lostAt = 0; banner(''); };
  socket.onclose = (ev) => {
    if (ws !== socket || leaving) return;
    if (ev.code === 4001 || ev.code === 4003 || ev.code === 4004) return left(ev.reason || '连接被拒绝');
    if (!lostAt) lostAt = Date.now();
    if (Date.now() - lostAt > RECONNECT_WINDOW_MS) return left('网络中断，重连失败');
    banner('网络中断，正在重新连接…');
    setTimeout(connect, 1000);
  };
}

function banner(/** @type {string} */ text) {
  const el = $('banner');
  el.textContent = text;
  el.hidden = !text;
}

function left(/** @type {string} */ reason) {
  leaving = true;
  pub?.close();
  sub?.close();
  camStream?.getTracks().forEach((t) => t.stop());
  screenStream?.getTracks().forEach((t) => t.stop());
  ws?.close();
  $('meeting').hidden = true;
  $('left').hidden = false;
  $('left-reason').textContent = reason;
}

function newPeerConnections() {
  pub?.close();
  sub?.close();
  midInfo.clear();
  remoteTracks.clear();
  pub = new RTCPeerConnection({ iceServers, bundlePolicy: 'max-bundle' });
  sub = new RTCPeerConnection({ iceServers, bundlePolicy: 'max-bundle' });
  const p = pub;
  const s = sub;
  p.onicecandidate = (e) => e.candidate && send({ type: 'candidate', target: 'publisher', candidate: e.candidate.toJSON() });
  s.onicecandidate = (e) => e.candidate && send({ type: 'candidate', target: 'subscriber', candidate: e.candidate.toJSON() });
  s.ontrack = (e) => {
    const info = midInfo.get(e.transceiver.mid);
    if (!info) return;
    remoteTracks.set(info.track, e.track);
    render();
  };
  negotiation = Promise.resolve();
}

/** Publishes what we have: camera and microphone, and the screen while it is shared. */
function publishLocal() {
  if (!pub) return;
  const you = participants.get(me);
  if (you && !you.can_publish) return;
  for (const t of camStream?.getTracks() ?? []) {
    // Camera video goes out in three sizes (simulcast); the server gives each viewer the one that
    // fits its window and its bandwidth.
    const sendEncodings = t.kind === 'video' ? SIMULCAST : undefined;
    const tr = pub.addTransceiver(t, { direction: 'sendonly', streams: [camStream], sendEncodings });
    if (t.kind === 'video') preferCodec(tr);
  }
  for (const t of screenStream?.getVideoTracks() ?? []) {
    preferCodec(pub.addTransceiver(t, { direction: 'sendonly' }));
  }
  renegotiate();
}

/** One publisher offer at a time; each waits for its answer. */
function renegotiate() {
  negotiation = negotiation.then(async () => {
    const p = pub;
    if (!p) return;
    const offer = await p.createOffer();
    await p.setLocalDescription(offer);
    const tracks = p.getTransceivers()
      .filter((t) => t.sender.track && t.mid !== null)
      .map((t) => ({ mid: t.mid, source: sourceOf(/** @type {MediaStreamTrack} */ (t.sender.track)) }));
    const answer = new Promise((resolve) => { pendingAnswer = resolve; });
    send({ type: 'offer', sdp: offer.sdp, tracks });
    const sdp = await answer;
    if (p === pub) await p.setRemoteDescription({ type: 'answer', sdp: /** @type {string} */ (sdp) });
  }).catch((e) => console.error('negotiation failed', e));
}

function sourceOf(/** @type {MediaStreamTrack} */ t) {
  if (screenStream?.getTracks().includes(t)) return t.kind === 'audio' ? 'screen_audio' : 'screen';
  return t.kind === 'audio' ? 'microphone' : 'camera';
}

async function handle(/** @type {any} */ msg) {
  events.push(msg.type);
  switch (msg.type) {
    case 'joined': {
      me = msg.you.identity;
      iceServers = msg.ice_servers;
      videoCodec = msg.video_codec;
      setRecording(msg.recording);
      $('record-button').hidden = !msg.you.can_record;
      participants.clear();
      for (const p of msg.participants) participants.set(p.identity, p);
      participants.set(me, msg.you);
      newPeerConnections();
      publishLocal();
      render();
      break;
    }
    case 'answer':
      pendingAnswer?.(msg.sdp);
      pendingAnswer = null;
      break;
    case 'offer': {
      for (const m of msg.tracks) midInfo.set(m.mid, m);
      const s = /** @type {RTCPeerConnection} */ (sub);
      await s.setRemoteDescription({ type: 'offer', sdp: msg.sdp });
      const answer = await s.createAnswer();
      await s.setLocalDescription(answer);
      send({ type: 'answer', sdp: answer.sdp });
      break;
    }
    case 'candidate': {
      const pc = msg.target === 'publisher' ? pub : sub;
      await pc?.addIceCandidate(msg.candidate).catch(() => {});
      break;
    }
    case 'participant_joined':
    case 'participant_updated':
      participants.set(msg.participant.identity, msg.participant);
      render();
      break;
    case 'participant_left':
      participants.delete(msg.identity);
      render();
      break;
    case 'track_published': {
      const p = participants.get(msg.track.participant);
      if (p) p.tracks = [...p.tracks.filter((/** @type {any} */ t) => t.id !== msg.track.id), msg.track];
      render();
      break;
    }
    case 'track_unpublished':
      for (const p of participants.values()) p.tracks = p.tracks.filter((/** @type {any} */ t) => t.id !== msg.track);
      remoteTracks.delete(msg.track);
      render();
      break;
    case 'active_speakers':
      for (const s of msg.speakers) speakersSeen.add(s);
      for (const el of document.querySelectorAll('.tile')) {
        el.classList.toggle('speaking', msg.speakers.includes(/** @type {HTMLElement} */ (el).dataset.identity));
      }
      break;
    case 'video_codec':
      if (msg.codec !== videoCodec) {
        videoCodec = msg.codec;
        republishVideo();
      }
      break;
    case 'recording':
      setRecording(msg.active);
      banner(msg.active ? '会议开始录制' : '录制已停止');
      break;
    case 'publisher_layers':
      await setLayers(msg.track, msg.active);
      break;
    case 'muted_by':
      setMic(false);
      banner('主持人已将您静音');
      break;
    case 'closed':
      left(msg.reason);
      break;
    case 'error':
      console.warn('server:', msg.code, msg.message);
      break;
  }
}

/** Everyone sees when the room is recorded; whoever may record gets the button. */
function setRecording(/** @type {boolean} */ active) {
  recording = active;
  $('recording').hidden = !active;
  $('record-button').textContent = active ? '停止录制' : '开始录制';
  $('record-button').setAttribute('aria-pressed', String(active));
}

/** Encode only the simulcast layers someone watches (the server says which). */
async function setLayers(/** @type {string} */ trackId, /** @type {boolean[]} */ active) {
  const source = participants.get(me)?.tracks.find((/** @type {any} */ t) => t.id === trackId)?.source ?? 'camera';
  for (const tr of pub?.getTransceivers() ?? []) {
    const track = tr.sender.track;
    if (!track || track.kind !== 'video' || sourceOf(track) !== source) continue;
    const params = tr.sender.getParameters();
    if (!params.encodings || params.encodings.length < 2) continue;
    params.encodings.forEach((e, i) => { e.active = active[i] ?? true; });
    await tr.sender.setParameters(params).catch((e) => console.warn('setParameters', e));
  }
}

// ---------- rendering ----------

function render() {
  const grid = $('grid');
  const wanted = new Map();
  for (const p of participants.values()) {
    const videos = p.tracks.filter((/** @type {any} */ t) => t.kind === 'video');
    if (p.identity === me) {
      wanted.set(`${me}/camera`, { p, stream: camStream, local: true, screen: false });
      continue;
    }
    if (videos.length === 0) wanted.set(`${p.identity}/none`, { p, stream: null, local: false, screen: false });
    for (const t of videos) {
      const mt = remoteTracks.get(t.id);
      wanted.set(t.id, { p, stream: mt ? new MediaStream([mt]) : null, local: false, screen: t.source === 'screen' });
    }
  }
  for (const el of [...grid.children]) {
    if (!wanted.has(/** @type {HTMLElement} */ (el).dataset.key)) el.remove();
  }
  for (const [key, w] of wanted) {
    let tile = /** @type {HTMLElement | null} */ (grid.querySelector(`[data-key="${CSS.escape(key)}"]`));
    if (!tile) {
      tile = document.createElement('div');
      tile.className = 'tile' + (w.screen ? ' screen' : '');
      tile.dataset.key = key;
      tile.dataset.identity = w.p.identity;
      const v = document.createElement('video');
      v.autoplay = true;
      v.playsInline = true;
      v.muted = true;
      const label = document.createElement('span');
      label.className = 'label';
      tile.append(v, label);
      grid.append(tile);
    }
    const v = /** @type {HTMLVideoElement} */ (tile.querySelector('video'));
    const currentId = /** @type {MediaStream | null} */ (v.srcObject)?.getTracks()[0]?.id;
    const nextId = w.stream?.getTracks().find((t) => t.kind === 'video')?.id;
    if (currentId !== nextId) v.srcObject = w.stream;
    /** @type {HTMLElement} */ (tile.querySelector('.label')).textContent =
      (w.p.name || w.p.identity) + (w.local ? '（我）' : '') + (w.screen ? ' · 屏幕共享' : '');
  }
  grid.className = 'grid ' + (wanted.size >= 5 ? 'many' : 'n' + wanted.size);
  askQualities();
  playAudio();
  renderPeople();
}

/** Asks for the simulcast layer that fits each remote video as it is displayed. */
function askQualities() {
  for (const tile of /** @type {NodeListOf<HTMLElement>} */ (document.querySelectorAll('.tile'))) {
    const track = tile.dataset.key ?? '';
    if (!track.startsWith('TR_')) continue;
    const width = tile.clientWidth * (window.devicePixelRatio || 1);
    const quality = width >= 960 ? 'high' : width >= 400 ? 'medium' : 'low';
    if (asked.get(track) !== quality) {
      asked.set(track, quality);
      send({ type: 'subscribe', track, subscribe: true, quality });
    }
  }
}
window.addEventListener('resize', () => askQualities());

function playAudio() {
  const keep = new Set();
  for (const [id, t] of remoteTracks) {
    if (t.kind !== 'audio') continue;
    keep.add(id);
    if (!document.querySelector(`audio[data-track="${CSS.escape(id)}"]`)) {
      const a = document.createElement('audio');
      a.autoplay = true;
      a.dataset.track = id;
      a.srcObject = new MediaStream([t]);
      document.body.append(a);
    }
  }
  for (const a of document.querySelectorAll('audio[data-track]')) {
    if (!keep.has(/** @type {HTMLElement} */ (a).dataset.track)) a.remove();
  }
}

function renderPeople() {
  const list = $('people-list');
  const items = [...participants.values()].map((p) => {
    const li = document.createElement('li');
    li.dataset.identity = p.identity;
    const mic = p.tracks.find((/** @type {any} */ t) => t.kind === 'audio');
    li.textContent = (p.name || p.identity) + (p.identity === me ? '（我）' : '') + (mic && mic.muted ? ' · 已静音' : '');
    return li;
  });
  list.replaceChildren(...items);
  $('people-count').textContent = `(${participants.size})`;
}

// ---------- controls ----------

function setMic(/** @type {boolean} */ on) {
  for (const t of camStream?.getAudioTracks() ?? []) t.enabled = on;
  $('mic-button').setAttribute('aria-pressed', String(!on));
  $('mic-button').textContent = on ? '静音' : '取消静音';
  const id = ownTrackId('microphone');
  if (id) send({ type: 'mute', track: id, muted: !on });
}

function setCam(/** @type {boolean} */ on) {
  for (const t of camStream?.getVideoTracks() ?? []) t.enabled = on;
  $('cam-button').setAttribute('aria-pressed', String(!on));
  $('cam-button').textContent = on ? '关闭摄像头' : '打开摄像头';
  const id = ownTrackId('camera');
  if (id) send({ type: 'mute', track: id, muted: !on });
}

function ownTrackId(/** @type {string} */ source) {
  return participants.get(me)?.tracks.find((/** @type {any} */ t) => t.source === source)?.id;
}

async function toggleScreen() {
  if (screenStream) {
    const tracks = screenStream.getTracks();
    screenStream = null;
    for (const tr of pub?.getTransceivers() ?? []) {
      if (tr.sender.track && tracks.includes(tr.sender.track)) {
        const id = participants.get(me)?.tracks.find((/** @type {any} */ t) => t.source === 'screen')?.id;
        if (id) send({ type: 'unpublish', track: id });
        pub?.removeTrack(tr.sender);
      }
    }
    tracks.forEach((t) => t.stop());
    $('screen-button').setAttribute('aria-pressed', 'false');
    renegotiate();
    return;
  }
  try {
    screenStream = await navigator.mediaDevices.getDisplayMedia({ video: true, audio: false });
  } catch {
    return;
  }
  const [track] = screenStream.getVideoTracks();
  track.addEventListener('ended', () => { if (screenStream) toggleScreen(); });
  if (pub) preferCodec(pub.addTransceiver(track, { direction: 'sendonly' }));
  $('screen-button').setAttribute('aria-pressed', 'true');
  renegotiate();
}

$('mic-button').addEventListener('click', () => setMic($('mic-button').getAttribute('aria-pressed') === 'true'));
$('cam-button').addEventListener('click', () => setCam($('cam-button').getAttribute('aria-pressed') === 'true'));
$('screen-button').addEventListener('click', () => toggleScreen());
$('people-button').addEventListener('click', () => { $('people').hidden = !$('people').hidden; });
$('record-button').addEventListener('click', () => send({ type: 'record', start: !recording }));
$('leave-button').addEventListener('click', () => { send({ type: 'leave' }); left('您已离开会议'); });

// Connection quality from what the browser measures: round-trip time and loss.
setInterval(async () => {
  if (!pub || $('meeting').hidden) return;
  /** @type {number | null} */
  let rtt = null;
  let lost = 0;
  let received = 0;
  for (const pc of [pub, sub]) {
    if (!pc) continue;
    const stats = await pc.getStats();
    stats.forEach((s) => {
      if (s.type === 'candidate-pair' && s.nominated && s.currentRoundTripTime !== undefined) rtt = s.currentRoundTripTime;
      if (s.type === 'inbound-rtp') { lost += s.packetsLost ?? 0; received += s.packetsReceived ?? 0; }
    });
  }
  const loss = received + lost > 0 ? lost / (received + lost) : 0;
  const el = $('quality');
  const r = /** @type {number | null} */ (rtt);
  const level = r === null ? 'unknown' : r < 0.15 && loss < 0.02 ? 'good' : r < 0.4 && loss < 0.08 ? 'fair' : 'poor';
  el.dataset.level = level;
  el.textContent = { good: '连接良好', fair: '连接一般', poor: '连接较差', unknown: '连接中…' }[level];
}, 2000);

// Listen before the camera opens, so an early click joins instead of submitting the form.
const ready = prejoin();
$('prejoin-form').addEventListener('submit', (e) => {
  e.preventDefault();
  ready.finally(join);
});
