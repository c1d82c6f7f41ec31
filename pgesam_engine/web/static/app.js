// pGESAM-RT timbre map: draw the bundle's map, choose a timbre, fetch its prerendered notes, play them with Web Audio.
// The server prerenders a chosen timbre's pitches; this page polls /api/timbre for progress and fetches each ready
// note (/api/note, float32 WAV) once, so keys play from decoded AudioBuffers at once. window.pgesamState shows
// what the page did (tests read it).
"use strict";

const FAMILY_COLOURS = {
  bass: "#e6194b", brass: "#f58231", flute: "#ffe119", guitar: "#bfef45", keyboard: "#3cb44b", mallet: "#42d4f4",
  organ: "#4363d8", reed: "#911eb4", string: "#f032e6", synth_lead: "#a9a9a9", vocal: "#fabed4",
};
const MARKER = "#ff2d55";
const KEYS = ["a", "w", "s", "e", "d", "f", "t", "g", "y", "h", "u", "j", "k"];  // C .. C, black keys w e t y u
const NAMES = ["C", "C#", "D", "D#", "E", "F", "F#", "G", "G#", "A", "A#", "B"];
const RELEASE_S = 0.08, POLL_MS = 200, DRAG_MS = 120, KEEP_TIMBRES = 6, FETCHES = 4;

const state = window.pgesamState = {
  ready: false, map: null, chosen: null, marker: null, upload: null, octave: 0, progress: null,
  fetched: 0, decoded: 0, notes: [], played: [], message: "", error: "", midi: "unknown",
};
const $ = (id) => document.getElementById(id);
const canvas = $("map"), g = canvas.getContext("2d");
const buffers = new Map();  // "x,y" -> Map(pitch -> AudioBuffer), most recent last
const inflight = new Set();  // "x,y,pitch" being fetched
const held = new Map();  // pitch -> {source, gain}
const waiting = new Map();  // pitch -> velocity: pressed before its note was ready
let audio = null, hover = null, dragging = false, lastDrag = 0, pollTimer = null, chooseSeq = 0;

const keyOf = (p) => `${p.x},${p.y}`;
const noteName = (m) => `${NAMES[m % 12]}${Math.floor(m / 12) - 1}`;

function say(text, kind = "info") {
  const el = $("message");
  el.textContent = text;
  el.className = `message ${text ? kind : ""}`;
  state.message = text;
  if (kind === "error") state.error = text;
}

async function api(path, options = {}) {
  const res = await fetch(path, options);
  const type = res.headers.get("Content-Type") || "";
  const body = type.includes("json") ? await res.json() : null;
  if (!res.ok) throw new Error(body && body.error ? body.error : `${res.status} ${res.statusText}`);
  return {status: res.status, body, res};
}

const postJson = (path, data) => api(path, {method: "POST", headers: {"Content-Type": "application/json"},
                                            body: JSON.stringify(data)});

// ------------------------------------------------------------------------------------------------- the map
function view() {
  const m = state.map, w = canvas.clientWidth, h = canvas.clientHeight, pad = 28;
  const [x0, x1] = m.bounds.x, [y0, y1] = m.bounds.y;
  const scale = Math.min((w - 2 * pad) / (x1 - x0), (h - 2 * pad) / (y1 - y0));
  const cx = w / 2 - scale * (x0 + x1) / 2, cy = h / 2 + scale * (y0 + y1) / 2;
  return {scale, toPx: (x, y) => [cx + scale * x, cy - scale * y], toMap: (px, py) => [(px - cx) / scale, (cy - py) / scale]};
}

function colour(family) {
  if (FAMILY_COLOURS[family]) return FAMILY_COLOURS[family];
  let h = 0;
  for (const c of family) h = (h * 31 + c.charCodeAt(0)) % 360;
  return `hsl(${h}, 70%, 60%)`;
}

function draw() {
  const dpr = window.devicePixelRatio || 1, w = canvas.clientWidth, h = canvas.clientHeight;
  if (canvas.width !== Math.round(w * dpr)) { canvas.width = Math.round(w * dpr); canvas.height = Math.round(h * dpr); }
  g.setTransform(dpr, 0, 0, dpr, 0, 0);
  g.clearRect(0, 0, w, h);
  if (!state.map) return;
  const v = view(), m = state.map;
  const [bx0, by0] = v.toPx(m.bounds.x[0], m.bounds.y[1]), [bx1, by1] = v.toPx(m.bounds.x[1], m.bounds.y[0]);
  g.strokeStyle = "#2c3340"; g.lineWidth = 1; g.strokeRect(bx0, by0, bx1 - bx0, by1 - by0);
  const [ox, oy] = v.toPx(0, 0);
  g.beginPath(); g.moveTo(bx0, oy); g.lineTo(bx1, oy); g.moveTo(ox, by0); g.lineTo(ox, by1); g.stroke();
  g.strokeStyle = "#56607a"; g.setLineDash([4, 4]);
  g.beginPath(); g.arc(ox, oy, v.scale * m.radius, 0, 2 * Math.PI); g.stroke(); g.setLineDash([]);
  for (const inst of m.instruments) {
    const [px, py] = v.toPx(inst.x, inst.y);
    g.fillStyle = colour(inst.family); g.globalAlpha = inst === hover ? 1 : 0.85;
    g.beginPath(); g.arc(px, py, inst === hover ? 6 : 4, 0, 2 * Math.PI); g.fill();
  }
  g.globalAlpha = 1;
  if (state.upload) drawUpload(v);
  if (state.marker) drawMarker(v);
  if (hover) label(v, hover);
}

function drawMarker(v) {
  const [px, py] = v.toPx(state.marker.x, state.marker.y);
  state.marker.px = px; state.marker.py = py;
  g.strokeStyle = MARKER; g.lineWidth = 1.5;
  g.beginPath(); g.moveTo(px - 14, py); g.lineTo(px + 14, py); g.moveTo(px, py - 14); g.lineTo(px, py + 14); g.stroke();
  g.fillStyle = MARKER; g.beginPath(); g.arc(px, py, 7, 0, 2 * Math.PI); g.fill();
  g.strokeStyle = "#fff"; g.lineWidth = 2; g.beginPath(); g.arc(px, py, 8, 0, 2 * Math.PI); g.stroke();
}

function drawUpload(v) {
  const [px, py] = v.toPx(state.upload.x, state.upload.y);
  g.fillStyle = "#fff"; g.beginPath();
  g.moveTo(px, py - 8); g.lineTo(px + 8, py); g.lineTo(px, py + 8); g.lineTo(px - 8, py); g.closePath(); g.fill();
  g.font = "12px system-ui, sans-serif"; g.fillText(state.upload.file, px + 10, py + 4);
}

function label(v, inst) {
  const [px, py] = v.toPx(inst.x, inst.y), text = `${inst.name} (${inst.family})`;
  g.font = "12px system-ui, sans-serif";
  const w = g.measureText(text).width + 10, x = Math.min(px + 8, canvas.clientWidth - w - 2);
  g.fillStyle = "rgba(12,15,20,.9)"; g.fillRect(x, py - 22, w, 18);
  g.fillStyle = "#e6e8ec"; g.fillText(text, x + 5, py - 9);
}

function pointer(ev) {
  const r = canvas.getBoundingClientRect();
  return [ev.clientX - r.left, ev.clientY - r.top];
}

function nearestInstrument(px, py) {
  const v = view();
  let best = null, bestD = 9;
  for (const inst of state.map.instruments) {
    const [ix, iy] = v.toPx(inst.x, inst.y), d = Math.hypot(ix - px, iy - py);
    if (d < bestD) { best = inst; bestD = d; }
  }
  return best;
}

// ------------------------------------------------------------------------------------------------- choosing a timbre
async function choose(x, y, play) {
  const seq = ++chooseSeq;
  try {
    const {body} = await postJson("/api/timbre", {x, y});
    if (seq !== chooseSeq) return;  // a later choice (dragging) overtook this one
    setChosen(body);
    if (body.message) say(body.message, "info");
    else if (!body.error) say("");
    if (play) noteOn(Number($("pitch").value), 100);
  } catch (e) {
    say(`cannot choose that timbre: ${e.message}`, "error");
  }
}

function setChosen(p) {
  const changed = !state.chosen || keyOf(state.chosen) !== keyOf(p);
  state.chosen = {x: p.x, y: p.y, clamped: p.clamped};
  state.marker = {x: p.x, y: p.y};
  $("point").textContent = `point: (${p.x.toFixed(3)}, ${p.y.toFixed(3)})${p.clamped ? " — moved onto the map" : ""}`;
  const near = state.map.instruments.map((i) => [Math.hypot(i.x - p.x, i.y - p.y), i]).sort((a, b) => a[0] - b[0])[0];
  $("nearest").textContent = near ? `nearest: ${near[1].name} (${near[1].family}), ${near[0].toFixed(3)} away` : "";
  if (changed) {
    for (const pitch of held.keys()) noteOff(pitch);
    waiting.clear();
  }
  showProgress(p);
  draw();
  poll();
}

function timbreBuffers(key) {
  let m = buffers.get(key);
  if (!m) {
    m = new Map(); buffers.set(key, m);
    while (buffers.size > KEEP_TIMBRES) buffers.delete(buffers.keys().next().value);
  } else { buffers.delete(key); buffers.set(key, m); }
  return m;
}

function showProgress(p) {
  state.progress = p;
  const have = buffers.has(keyOf(p)) ? buffers.get(keyOf(p)).size : 0;
  $("progress-bar").style.width = `${(100 * p.ready.length) / p.total}%`;
  const what = p.complete ? "all pitches rendered" : `rendering: ${p.ready.length} of ${p.total} pitches ready`;
  $("progress").textContent = `${what}; ${have} loaded in the page`;
  if (p.error) say(p.error, "error");
  status();
}

async function poll() {
  clearTimeout(pollTimer);
  const chosen = state.chosen;
  if (!chosen) return;
  try {
    const {body} = await api(`/api/timbre?x=${chosen.x}&y=${chosen.y}`);
    if (state.chosen !== chosen) return;
    const mine = timbreBuffers(keyOf(chosen));
    for (const pitch of body.ready) {
      if (!mine.has(pitch)) fetchNote(chosen, pitch);
    }
    showProgress(body);
    if (body.complete && mine.size === body.total) return;
  } catch (e) {
    say(`progress: ${e.message}`, "error");
  }
  pollTimer = setTimeout(poll, POLL_MS);
}

// ------------------------------------------------------------------------------------------------- notes
async function fetchNote(point, pitch) {
  const id = `${keyOf(point)},${pitch}`;
  if (inflight.has(id) || (inflight.size >= FETCHES && !waiting.has(pitch))) return;  // the next poll asks again
  inflight.add(id);
  try {
    const url = `/api/note?x=${point.x}&y=${point.y}&pitch=${pitch}&format=wav`;
    let res = await fetch(url);
    for (let tries = 0; res.status === 202; tries++) {  // not rendered yet: the server streams it now
      await res.json();
      if (tries > 600) throw new Error("the note did not render in time");
      await new Promise((done) => setTimeout(done, 100));
      res = await fetch(url);
    }
    if (!res.ok) throw new Error((await res.json()).error || res.statusText);
    const data = await res.arrayBuffer(), bytes = data.byteLength;  // decoding detaches `data`
    state.fetched += 1;
    const buffer = await ensureAudio().decodeAudioData(data);
    state.decoded += 1;
    timbreBuffers(keyOf(point)).set(pitch, buffer);
    state.notes.push({x: point.x, y: point.y, pitch, bytes, duration: buffer.duration,
                      sampleRate: buffer.sampleRate, length: buffer.length});
    if (state.notes.length > 200) state.notes.shift();
    if (state.chosen && keyOf(state.chosen) === keyOf(point) && waiting.has(pitch)) {
      const velocity = waiting.get(pitch);
      waiting.delete(pitch);
      start(pitch, velocity, buffer);
    }
    if (state.progress) showProgress(state.progress);
  } catch (e) {
    waiting.delete(pitch);
    say(`note ${pitch}: ${e.message}`, "error");
  } finally {
    inflight.delete(id);
  }
}

function ensureAudio() {
  if (!audio) audio = new AudioContext();
  if (audio.state === "suspended") audio.resume();
  return audio;
}

function inRange(pitch) {
  const m = state.map;
  if (pitch >= m.pitch_min && pitch <= m.pitch_max) return true;
  say(`MIDI pitch ${pitch} (${noteName(pitch)}) is outside this model's range ${m.pitch_min}-${m.pitch_max}`, "error");
  return false;
}

function noteOn(pitch, velocity) {
  if (!state.chosen) { say("choose a timbre on the map first", "error"); return; }
  if (!inRange(pitch)) return;
  ensureAudio();
  const buffer = timbreBuffers(keyOf(state.chosen)).get(pitch);
  if (buffer) start(pitch, velocity, buffer);
  else { waiting.set(pitch, velocity); fetchNote(state.chosen, pitch); }
  if (state.map.mirror) postJson("/api/play", {pitch, velocity, ...state.chosen}).catch((e) => say(e.message, "error"));
  pianoKey(pitch, true);
}

function start(pitch, velocity, buffer) {
  if (held.has(pitch)) noteOff(pitch, true);
  if (state.map.mirror) return;  // the engine's own output plays it
  const ctx = ensureAudio(), source = ctx.createBufferSource(), gain = ctx.createGain();
  source.buffer = buffer;
  gain.gain.value = 0.8 * (velocity / 127) ** 2;
  source.connect(gain).connect(ctx.destination);
  source.start();
  source.onended = () => {
    if (held.get(pitch)?.source === source) { held.delete(pitch); pianoKey(pitch, false); }
  };
  held.set(pitch, {source, gain});
  state.played.push({pitch, velocity, x: state.chosen.x, y: state.chosen.y, duration: buffer.duration});
  if (state.played.length > 200) state.played.shift();
  status();
}

function noteOff(pitch, quiet = false) {
  const voice = held.get(pitch);
  if (voice) {
    const t = audio.currentTime;
    voice.gain.gain.setValueAtTime(voice.gain.gain.value, t);
    voice.gain.gain.linearRampToValueAtTime(0, t + RELEASE_S);
    voice.source.stop(t + RELEASE_S + 0.01);
    held.delete(pitch);
  }
  if (!quiet && state.map.mirror) postJson("/api/release", {pitch}).catch(() => {});
  pianoKey(pitch, false);
}

// ------------------------------------------------------------------------------------------------- keyboard, MIDI
function octaveBase() {
  const m = state.map, low = Math.ceil(m.pitch_min / 12) * 12;
  return state.octave && low + 12 <= m.pitch_max ? low + 12 : low;
}

function buildPiano() {
  const piano = $("piano");
  piano.textContent = "";
  KEYS.forEach((k, i) => {
    const key = document.createElement("div");
    key.className = [1, 3, 6, 8, 10].includes(i % 12) ? "black" : "white";
    key.dataset.offset = i;
    key.addEventListener("pointerdown", (ev) => { ev.preventDefault(); noteOn(octaveBase() + i, 100); });
    key.addEventListener("pointerup", () => noteOff(octaveBase() + i));
    key.addEventListener("pointerleave", () => { if (held.has(octaveBase() + i)) noteOff(octaveBase() + i); });
    piano.appendChild(key);
  });
  labelPiano();
}

function labelPiano() {
  const base = octaveBase(), m = state.map;
  for (const key of $("piano").children) {
    const pitch = base + Number(key.dataset.offset);
    key.textContent = KEYS[key.dataset.offset];
    key.title = `${noteName(pitch)} (${pitch})`;
    key.classList.toggle("off-range", pitch < m.pitch_min || pitch > m.pitch_max);
    key.classList.toggle("on", held.has(pitch));
  }
  $("octave").textContent = `${noteName(base)}–${noteName(base + 12)} (${base}–${base + 12})`;
}

function pianoKey(pitch, on) {
  const key = $("piano").children[pitch - octaveBase()];
  if (key) key.classList.toggle("on", on);
}

function onKey(ev, down) {
  if (ev.metaKey || ev.ctrlKey || ev.altKey || ev.target.tagName === "TEXTAREA") return;
  const k = ev.key.toLowerCase();
  if (k === "q" && down && !ev.repeat) {
    state.octave = 1 - state.octave;
    labelPiano();
    return;
  }
  const i = KEYS.indexOf(k);
  if (i < 0 || ev.repeat) return;
  ev.preventDefault();
  if (down) noteOn(octaveBase() + i, 100); else noteOff(octaveBase() + i);
}

function startMidi() {
  if (!navigator.requestMIDIAccess) { state.midi = "unavailable"; $("midi").textContent = "Web MIDI: not offered by this browser"; return; }
  navigator.requestMIDIAccess({sysex: false}).then((access) => {
    const connect = () => {
      const names = [];
      for (const input of access.inputs.values()) { input.onmidimessage = onMidi; names.push(input.name); }
      state.midi = names.length ? names.join(", ") : "no inputs";
      $("midi").textContent = `Web MIDI: ${state.midi}`;
    };
    access.onstatechange = connect;
    connect();
  }).catch((e) => { state.midi = "refused"; $("midi").textContent = `Web MIDI: ${e.message || "refused"}`; });
}

function onMidi(msg) {
  const [status, pitch, velocity] = msg.data, kind = status & 0xf0;
  if (kind === 0x90 && velocity > 0) noteOn(pitch, velocity);
  else if (kind === 0x80 || kind === 0x90) noteOff(pitch);
}

// ------------------------------------------------------------------------------------------------- upload
async function upload(file) {
  const limit = state.map.max_upload_mb * 2 ** 20;
  if (file.size > limit) { say(`${file.name} is larger than the ${state.map.max_upload_mb} MB upload limit`, "error"); return; }
  $("upload").textContent = `placing ${file.name} on the map…`;
  const form = new FormData();
  form.append("file", file, file.name);
  try {
    const {body} = await api("/api/encode", {method: "POST", body: form});
    state.upload = body;
    const near = body.nearest.length ? `; nearest: ${body.nearest[0].name} (${body.nearest[0].family})` : "";
    $("upload").textContent = `${body.file}: (${body.x.toFixed(3)}, ${body.y.toFixed(3)}), pitch ${body.pitch} ` +
      `(${noteName(body.pitch)})${near}`;
    $("pitch").value = body.pitch;
    showPitch();
    await choose(body.x, body.y, false);
    if (body.message) say(body.message, "info");
  } catch (e) {
    $("upload").textContent = "";
    say(`cannot place ${file.name}: ${e.message}`, "error");
  }
}

function setupDrop() {
  const drop = $("drop"), input = $("file");
  input.addEventListener("change", () => { if (input.files.length) upload(input.files[0]); input.value = ""; });
  drop.addEventListener("dragover", (ev) => { ev.preventDefault(); drop.classList.add("over"); });
  drop.addEventListener("dragleave", () => drop.classList.remove("over"));
  drop.addEventListener("drop", (ev) => {
    ev.preventDefault(); drop.classList.remove("over");
    if (ev.dataTransfer.files.length) upload(ev.dataTransfer.files[0]);
  });
}

// ------------------------------------------------------------------------------------------------- wiring
function showPitch() {
  const p = Number($("pitch").value);
  $("pitch-out").textContent = `${p} (${noteName(p)})`;
}

function status() {
  const c = state.chosen, p = state.progress;
  $("status").textContent = c ? `timbre (${c.x.toFixed(3)}, ${c.y.toFixed(3)}) · ${p ? p.ready.length : 0}/` +
    `${p ? p.total : "?"} rendered · ${state.decoded} notes loaded · ${state.played.length} played` : "choose a timbre";
}

function setupMap() {
  canvas.addEventListener("pointerdown", (ev) => {
    ensureAudio();
    dragging = true; canvas.setPointerCapture(ev.pointerId);
    const [x, y] = view().toMap(...pointer(ev));
    state.marker = {x, y}; draw();
  });
  canvas.addEventListener("pointermove", (ev) => {
    const [px, py] = pointer(ev);
    if (dragging) {
      const [x, y] = view().toMap(px, py);
      state.marker = {x, y};
      if (performance.now() - lastDrag > DRAG_MS) { lastDrag = performance.now(); choose(x, y, false); }
    }
    const near = nearestInstrument(px, py);
    if (near !== hover || dragging) { hover = near; canvas.title = near ? `${near.name} (${near.family})` : ""; draw(); }
  });
  canvas.addEventListener("pointerup", (ev) => {
    if (!dragging) return;
    dragging = false;
    const [x, y] = view().toMap(...pointer(ev));
    choose(x, y, $("play-on-click").checked);
  });
  canvas.addEventListener("pointerleave", () => { if (hover && !dragging) { hover = null; draw(); } });
}

async function main() {
  try {
    state.map = (await api("/api/map")).body;
  } catch (e) {
    $("status").textContent = `cannot load the map: ${e.message}`;
    return;
  }
  const m = state.map, slider = $("pitch");
  slider.min = m.pitch_min; slider.max = m.pitch_max;
  slider.value = Math.min(m.pitch_max, Math.max(m.pitch_min, 60));
  showPitch();
  slider.addEventListener("input", showPitch);
  slider.addEventListener("change", () => noteOn(Number(slider.value), 100));
  $("play").addEventListener("click", () => noteOn(Number(slider.value), 100));
  for (const family of m.families) {
    const item = document.createElement("span"), dot = document.createElement("i");
    dot.style.background = colour(family);
    item.append(dot, family);
    $("legend").appendChild(item);
  }
  buildPiano();
  setupMap();
  setupDrop();
  window.addEventListener("keydown", (ev) => onKey(ev, true));
  window.addEventListener("keyup", (ev) => onKey(ev, false));
  window.addEventListener("resize", draw);
  startMidi();
  setChosen(m.timbre);
  state.ready = true;
}

main();
