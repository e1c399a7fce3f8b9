/* Portway agent web UI. Plain ES2020, no dependencies.
 * All server data is rendered with textContent / createElement only. */
'use strict';
(() => {
  const TOKEN = (document.querySelector('meta[name="portway-token"]') || {}).content || '';
  const MAX_ROWS = 500;        // rows kept in the DOM
  const MAX_KEEP = 1000;       // summaries kept in memory
  const HEX_LIMIT = 4096;      // bytes shown in a hex dump
  const MASK = '••••••';
  const SVGNS = 'http://www.w3.org/2000/svg';
  const $ = (id) => document.getElementById(id);
  const enc = encodeURIComponent;
  let uidSeq = 0;
  const uid = (p) => `${p}-${++uidSeq}`;

  // ---------- DOM helpers ----------
  function h(tag, attrs, ...children) {
    const e = document.createElement(tag);
    if (attrs) {
      for (const [k, v] of Object.entries(attrs)) {
        if (v == null || v === false) continue;
        if (k === 'class') e.className = v;
        else if (k.startsWith('on') && typeof v === 'function') e.addEventListener(k.slice(2), v);
        else e.setAttribute(k, v === true ? '' : String(v));
      }
    }
    for (const k of kids(...children)) e.append(k instanceof Node ? k : String(k));
    return e;
  }
  function s(tag, attrs) {
    const e = document.createElementNS(SVGNS, tag);
    for (const [k, v] of Object.entries(attrs || {})) e.setAttribute(k, String(v));
    return e;
  }
  const kids = (...k) => k.flat(Infinity).filter((x) => x != null && x !== false);
  const setText = (e, t) => { t = t == null ? '' : String(t); if (e.textContent !== t) e.textContent = t; };

  // ---------- formatting ----------
  function fmtBytes(n) {
    if (n == null || !isFinite(n)) return '—';
    n = Number(n);
    const u = ['B', 'KiB', 'MiB', 'GiB', 'TiB'];
    let i = 0;
    while (Math.abs(n) >= 1024 && i < u.length - 1) { n /= 1024; i++; }
    return (i === 0 ? String(Math.round(n)) : n.toFixed(n < 10 ? 1 : 0)) + ' ' + u[i];
  }
  const fmtRate = (n) => fmtBytes(n) + '/s';
  function fmtNum(n) {
    n = Number(n) || 0;
    if (n === 0) return '0';
    if (n < 10) return n.toFixed(n < 1 ? 2 : 1).replace(/\.?0+$/, '');
    return Math.round(n).toLocaleString();
  }
  function fmtMs(ms) {
    if (ms == null || !isFinite(ms)) return '—';
    return (ms < 10 ? Number(ms).toFixed(1) : Math.round(ms).toLocaleString()) + ' ms';
  }
  function fmtTime(iso) {
    const d = new Date(iso);
    if (!iso || isNaN(d)) return iso || '—';
    return d.toLocaleTimeString([], { hour12: false }) + '.' + String(d.getMilliseconds()).padStart(3, '0');
  }
  function statusBadge(status, error) {
    const cls = status == null ? 'st-none' : `st-${String(status)[0]}xx`;
    const b = h('span', { class: `badge ${cls}`, title: error || null }, status == null ? '—' : String(status));
    if (error) {
      b.append(h('span', { 'aria-hidden': 'true', class: 'err-mark' }, ' ⚠'));
      b.append(h('span', { class: 'sr-only' }, ` (error: ${error})`));
    }
    return b;
  }
  const STATE_ICON = { online: '●', paused: '❚❚', reconnecting: '↻', refused: '✕', starting: '…', offline: '○' };
  function stateBadge(state) {
    const st = state || 'unknown';
    return h('span', { class: `badge state state-${st.replace(/[^a-z]/gi, '')}` },
      h('span', { 'aria-hidden': 'true' }, (STATE_ICON[st] || '•') + ' '), st);
  }

  // ---------- API ----------
  class ApiError extends Error {
    constructor(msg, status, field) { super(msg); this.status = status; this.field = field; }
  }
  async function api(method, url, body, withToken) {
    const opt = { method, headers: { Accept: 'application/json' }, cache: 'no-store', credentials: 'same-origin' };
    // Every call carries the token: the cookie lets the page in, the header is what
    // changes and reveals need (a cross-site request cannot set it).
    opt.headers['X-Portway-Token'] = TOKEN;
    if (body !== undefined) {
      opt.headers['Content-Type'] = 'application/json';
      opt.body = JSON.stringify(body);
    }
    let res;
    try { res = await fetch(url, opt); } catch (e) { throw new ApiError(`network error (${e.message})`, 0); }
    if (res.status === 204) return null;
    const ct = res.headers.get('content-type') || '';
    let data = null;
    let text = '';
    if (ct.includes('json')) { try { data = await res.json(); } catch (_) { data = null; } } else { text = await res.text(); }
    if (!res.ok) {
      const msg = (data && data.error) || text.trim().slice(0, 300) || `HTTP ${res.status} ${res.statusText}`;
      throw new ApiError(msg, res.status, data && data.field);
    }
    return data;
  }
  function safeParse(s) { try { return JSON.parse(s); } catch (_) { return null; } }

  // ---------- state ----------
  const S = {
    info: null, tunnels: [], reqs: [], byId: new Map(),
    filter: '', tunnelSel: '', route: { page: null, id: null },
    detail: null, revealed: false, flash: null,
  };

  // ---------- header ----------
  function renderInfo() {
    const i = S.info;
    if (!i) return;
    setText($('device-name'), i.device || 'device');
    $('device-name').title = [i.project && `project ${i.project}`, i.node_id && `node ${i.node_id}`,
      i.mode && `mode ${i.mode}`, i.config_file && `config ${i.config_file}`].filter(Boolean).join(' · ');
    $('device-state').replaceWith(Object.assign(stateBadge(i.state), { id: 'device-state' }));
    $('add-tunnel').hidden = !i.editable;
    if (!i.editable) { $('add-form-wrap').hidden = true; $('add-tunnel').setAttribute('aria-expanded', 'false'); }
    renderTunnels();
  }
  function setLive(ok) {
    const l = $('live');
    l.classList.toggle('ok', ok);
    setText(l, ok ? 'live' : 'reconnecting…');
  }

  // ---------- router ----------
  function parseRoute() {
    const m = location.hash.match(/^#\/inspect(?:\/([^/?#]+))?\/?$/);
    if (m) return { page: 'inspect', id: m[1] ? decodeURIComponent(m[1]) : null };
    return { page: 'tunnels', id: null };
  }
  function route(userNav) {
    const prev = S.route;
    const r = parseRoute();
    S.route = r;
    if (!location.hash.startsWith('#/')) history.replaceState(null, '', '#/tunnels');
    $('page-tunnels').hidden = r.page !== 'tunnels';
    $('page-inspect').hidden = r.page !== 'inspect';
    for (const a of document.querySelectorAll('[data-nav]')) {
      if (a.dataset.nav === r.page) a.setAttribute('aria-current', 'page'); else a.removeAttribute('aria-current');
    }
    $('inspect').classList.toggle('has-detail', r.id != null);
    document.title = (r.page === 'tunnels' ? 'Tunnels' : r.id != null ? `Request #${r.id}` : 'Inspect') + ' · Portway agent';
    markSelected();
    if (r.page === 'inspect' && (r.id !== prev.id || prev.page !== 'inspect')) {
      loadDetail(r.id, false, userNav);
      if (r.id == null && prev.id != null && userNav) {
        const a = document.querySelector(`#req-body tr[data-id="${CSS.escape(prev.id)}"] a`);
        if (a) a.focus();
      }
    } else if (userNav && prev.page !== r.page) {
      const h1 = $(r.page === 'tunnels' ? 'h-tunnels' : 'h-inspect');
      h1.setAttribute('tabindex', '-1');
      h1.focus();
    }
  }

  // ---------- tunnels page ----------
  const cards = new Map(); // name -> card
  function setTunnels(list) {
    S.tunnels = Array.isArray(list) ? list : [];
    renderTunnels();
    updateTunnelSelect();
  }
  function renderTunnels() {
    const list = $('tunnel-list');
    const msg = $('tunnels-msg');
    msg.hidden = S.tunnels.length > 0;
    if (!S.tunnels.length) setText(msg, S.info && S.info.editable ? 'No tunnels yet. Use “Add tunnel” to create one.' : 'No tunnels.');
    const seen = new Set();
    S.tunnels.forEach((t, i) => {
      let c = cards.get(t.name);
      if (!c) { c = buildCard(t.name); cards.set(t.name, c); }
      updateCard(c, t);
      seen.add(t.name);
      if (list.children[i] !== c.el) list.insertBefore(c.el, list.children[i] || null);
    });
    for (const [name, c] of cards) if (!seen.has(name)) { c.el.remove(); cards.delete(name); }
  }

  function buildCard(name) {
    const p = uid('tn');
    const c = { name, data: null, key: {} };
    c.title = h('h2', { id: `${p}-h` }, name);
    c.proto = h('span', { class: 'proto' });
    c.badgeWrap = h('span', { class: 'state-wrap' });
    c.detail = h('span', { class: 'state-detail' });
    c.pause = h('button', { type: 'button', class: 'btn', 'aria-pressed': 'false', onclick: () => togglePause(c) }, 'Pause');
    c.edit = h('button', { type: 'button', class: 'btn', 'aria-expanded': 'false', hidden: true, onclick: () => toggleEdit(c) }, 'Edit');
    c.remove = h('button', { type: 'button', class: 'btn danger', hidden: true, onclick: () => removeTunnel(c) }, 'Remove');
    c.pause.setAttribute('aria-describedby', `${p}-h`);
    c.edit.setAttribute('aria-describedby', `${p}-h`);
    c.remove.setAttribute('aria-describedby', `${p}-h`);
    c.urls = h('dd');
    c.target = h('code');
    c.paths = h('dd');
    c.reqs = h('dd');
    c.bin = h('dd');
    c.bout = h('dd');
    c.chart = buildChart(p);
    c.condSummary = h('summary', null, 'Conditions');
    c.condBody = h('div', { class: 'table-wrap' });
    c.err = h('div', { class: 'alert', role: 'alert' });
    c.editWrap = h('div', { class: 'edit-wrap', id: `${p}-edit`, hidden: true });
    c.edit.setAttribute('aria-controls', `${p}-edit`);
    c.el = h('article', { class: 'card tunnel', 'aria-labelledby': `${p}-h`, 'data-tunnel': name },
      h('div', { class: 'card-head' },
        h('div', { class: 'card-title' }, c.title, c.proto, c.badgeWrap, c.detail),
        h('div', { class: 'actions' }, c.pause, c.edit, c.remove)),
      c.err,
      h('div', { class: 'card-body' },
        h('dl', { class: 'facts' },
          h('div', null, h('dt', null, 'Public URL'), c.urls),
          h('div', null, h('dt', null, 'Local target'), h('dd', null, c.target)),
          h('div', null, h('dt', null, 'Gateway path'), c.paths),
          h('div', null, h('dt', null, 'Requests'), c.reqs),
          h('div', null, h('dt', null, 'Bytes in'), c.bin),
          h('div', null, h('dt', null, 'Bytes out'), c.bout)),
        c.chart.fig),
      h('details', { class: 'conds' }, c.condSummary, c.condBody),
      c.editWrap);
    return c;
  }
  // Rebuild a sub-part only when the data it shows changed (keeps focus / selection stable).
  function changed(c, part, value) {
    const k = JSON.stringify(value);
    if (c.key[part] === k) return false;
    c.key[part] = k;
    return true;
  }
  function updateCard(c, t) {
    c.data = t;
    c.el.dataset.state = t.state || '';
    setText(c.proto, t.protocol || '');
    if (changed(c, 'state', t.state)) c.badgeWrap.replaceChildren(stateBadge(t.state));
    setText(c.detail, t.state_detail || '');
    c.pause.setAttribute('aria-pressed', String(!!t.paused));
    // Toggle button: the label stays "Pause" (WAI-ARIA APG); aria-pressed carries the state.
    c.pause.title = t.paused ? 'Paused: press to resume' : 'Pause: stop forwarding new requests';
    const editable = !!(S.info && S.info.editable && t.editable);
    c.edit.hidden = !editable;
    c.remove.hidden = !editable;
    if (!editable && !c.editWrap.hidden) closeEdit(c);
    if (changed(c, 'urls', t.urls)) {
      const urls = t.urls || [];
      c.urls.replaceChildren(urls.length
        ? h('ul', { class: 'plain' }, urls.map((u) => h('li', null, /^https?:\/\//i.test(u)
          ? h('a', { href: u, target: '_blank', rel: 'noopener noreferrer' }, u) : h('code', null, u))))
        : h('span', { class: 'muted' }, '—'));
    }
    setText(c.target, t.target || '—');
    if (changed(c, 'paths', t.paths)) {
      const ps = t.paths || [];
      c.paths.replaceChildren(ps.length ? h('ul', { class: 'plain' }, ps.map((p) => h('li', null,
        h('span', { class: `path-kind path-${p.path === 'direct' ? 'direct' : 'relay'}` }, p.path || '?'),
        ` · ${p.rtt_ms == null ? '—' : fmtMs(p.rtt_ms)} · `,
        h('code', { title: p.gateway || '' }, 'gw ' + String(p.gateway || '?').replace(/…$/, '').slice(0, 8)))))
        : h('span', { class: 'muted' }, 'not connected'));
    }
    setText(c.reqs, `${fmtNum(t.requests)} total · ${fmtNum(t.requests_per_s)}/s`);
    setText(c.bin, fmtBytes(t.bytes_in));
    setText(c.bout, fmtBytes(t.bytes_out));
    updateChart(c.chart, t);
    const conds = t.conditions || [];
    const bad = conds.filter((x) => x.status !== 'True').length;
    setText(c.condSummary, `Conditions (${conds.length}${bad ? `, ${bad} not true` : ''})`);
    if (changed(c, 'conds', conds)) {
      c.condBody.replaceChildren(conds.length ? h('table', { class: 'conds-table' },
        h('caption', { class: 'sr-only' }, `Conditions of tunnel ${t.name}`),
        h('thead', null, h('tr', null, ['Object', 'Type', 'Status', 'Reason', 'Message'].map((x) => h('th', { scope: 'col' }, x)))),
        h('tbody', null, conds.map((x) => h('tr', null,
          h('td', null, x.object || ''), h('th', { scope: 'row' }, x.type || ''),
          h('td', null, h('span', { class: `cond cond-${x.status === 'True' ? 'ok' : x.status === 'False' ? 'bad' : 'unk'}` }, x.status || '')),
          h('td', null, x.reason || ''), h('td', { class: 'msg' }, x.message || '')))))
        : h('p', { class: 'muted' }, 'No conditions reported.'));
    }
  }

  // ---------- chart ----------
  const CW = 600, CH = 100, SLOTS = 60;
  function buildChart(p) {
    const ch = {};
    ch.svg = s('svg', { viewBox: `0 0 ${CW} ${CH}`, preserveAspectRatio: 'none', class: 'chart', role: 'img', 'aria-labelledby': `${p}-ct` });
    ch.title = s('title', { id: `${p}-ct` });
    const grid = s('g', { class: 'grid' });
    for (const y of [0.25, 0.5, 0.75]) grid.append(s('line', { x1: 0, x2: CW, y1: CH * y, y2: CH * y, 'vector-effect': 'non-scaling-stroke' }));
    ch.bars = s('g', { class: 'bars' });
    ch.rects = [];
    for (let i = 0; i < SLOTS; i++) {
      const r = s('rect', { x: (i * CW) / SLOTS + 1, width: CW / SLOTS - 2, y: CH, height: 0 });
      ch.rects.push(r);
      ch.bars.append(r);
    }
    ch.lin = s('polyline', { class: 'l-in', fill: 'none', 'vector-effect': 'non-scaling-stroke' });
    ch.lout = s('polyline', { class: 'l-out', fill: 'none', 'vector-effect': 'non-scaling-stroke' });
    ch.svg.append(ch.title, grid, ch.bars, ch.lin, ch.lout);
    ch.vIn = h('b');
    ch.vOut = h('b');
    ch.vReq = h('b');
    ch.scale = h('span', { class: 'muted' });
    ch.fig = h('figure', { class: 'chart-fig' },
      h('div', { class: 'chart-box' }, ch.svg),
      h('figcaption', null,
        h('ul', { class: 'legend' },
          h('li', null, h('span', { class: 'sw sw-in', 'aria-hidden': 'true' }), 'In ', ch.vIn),
          h('li', null, h('span', { class: 'sw sw-out', 'aria-hidden': 'true' }), 'Out ', ch.vOut),
          h('li', null, h('span', { class: 'sw sw-req', 'aria-hidden': 'true' }), 'Requests ', ch.vReq),
          h('li', null, ch.scale))));
    return ch;
  }
  function updateChart(ch, t) {
    const hist = Array.isArray(t.history) ? t.history : [];
    const slots = Array.from({ length: SLOTS }, () => null);
    const tmax = hist.reduce((m, x) => (typeof x.t === 'number' && x.t > m ? x.t : m), -Infinity);
    hist.forEach((x, idx) => {
      const i = isFinite(tmax) && typeof x.t === 'number' ? SLOTS - 1 - (tmax - x.t) : SLOTS - hist.length + idx;
      if (i >= 0 && i < SLOTS) slots[i] = x;
    });
    const v = slots.map((x) => ({ i: (x && x.bytes_in) || 0, o: (x && x.bytes_out) || 0, r: (x && x.requests) || 0 }));
    const peakB = Math.max(0, ...v.map((x) => Math.max(x.i, x.o)));
    const peakR = Math.max(0, ...v.map((x) => x.r));
    const maxB = Math.max(1, peakB), maxR = Math.max(1, peakR);
    const px = (i) => (((i + 0.5) * CW) / SLOTS).toFixed(1);
    const py = (val) => (CH - 2 - (val / maxB) * (CH - 6)).toFixed(1);
    ch.lin.setAttribute('points', v.map((x, i) => `${px(i)},${py(x.i)}`).join(' '));
    ch.lout.setAttribute('points', v.map((x, i) => `${px(i)},${py(x.o)}`).join(' '));
    v.forEach((x, i) => {
      const hh = (x.r / maxR) * (CH * 0.9);
      ch.rects[i].setAttribute('y', (CH - hh).toFixed(1));
      ch.rects[i].setAttribute('height', hh.toFixed(1));
    });
    const cur = v[SLOTS - 1];
    setText(ch.vIn, fmtRate(cur.i));
    setText(ch.vOut, fmtRate(cur.o));
    setText(ch.vReq, `${fmtNum(t.requests_per_s)}/s`);
    setText(ch.scale, `last 60 s · peak ${fmtRate(peakB)}, ${fmtNum(peakR)} req/s`);
    setText(ch.title, `Traffic of ${t.name} over the last 60 seconds. Now ${fmtRate(cur.i)} in, ${fmtRate(cur.o)} out, ` +
      `${fmtNum(t.requests_per_s)} requests per second. Peak ${fmtRate(peakB)}, ${fmtNum(peakR)} requests per second.`);
  }

  // ---------- tunnel actions ----------
  async function togglePause(c) {
    if (c.pause.getAttribute('aria-busy') === 'true' || !c.data) return;
    c.pause.setAttribute('aria-busy', 'true');
    setText(c.err, '');
    try {
      const r = await api('POST', `/api/tunnels/${enc(c.name)}/pause`, { paused: !c.data.paused });
      const t = r && (r.tunnel || r);
      if (t && t.name) replaceTunnel(t);
    } catch (e) {
      setText(c.err, `Could not ${c.data.paused ? 'resume' : 'pause'} ${c.name}: ${e.message}`);
    } finally { c.pause.removeAttribute('aria-busy'); }
  }
  function replaceTunnel(t) {
    const i = S.tunnels.findIndex((x) => x.name === t.name);
    if (i >= 0) S.tunnels[i] = Object.assign({}, S.tunnels[i], t); else S.tunnels.push(t);
    renderTunnels();
    updateTunnelSelect();
  }
  async function refreshTunnels() {
    try { const d = await api('GET', '/api/tunnels'); setTunnels((d && d.tunnels) || []); } catch (_) { /* stream will catch up */ }
  }
  function toggleEdit(c) {
    if (!c.editWrap.hidden) { closeEdit(c); return; }
    c.editWrap.replaceChildren(tunnelForm(c.data, () => closeEdit(c, true)));
    c.editWrap.hidden = false;
    c.edit.setAttribute('aria-expanded', 'true');
    const f = c.editWrap.querySelector('input:not([readonly]), select');
    if (f) f.focus();
  }
  function closeEdit(c, focusBtn) {
    c.editWrap.hidden = true;
    c.editWrap.replaceChildren();
    c.edit.setAttribute('aria-expanded', 'false');
    if (focusBtn && !c.edit.hidden) c.edit.focus();
  }
  async function removeTunnel(c) {
    if (!window.confirm(`Remove tunnel “${c.name}”? Its public URL stops working.`)) return;
    setText(c.err, '');
    try {
      await api('DELETE', `/api/tunnels/${enc(c.name)}`);
      S.tunnels = S.tunnels.filter((x) => x.name !== c.name);
      renderTunnels();
      $('h-tunnels').setAttribute('tabindex', '-1');
      $('h-tunnels').focus();
      refreshTunnels();
    } catch (e) { setText(c.err, `Could not remove ${c.name}: ${e.message}`); }
  }
  function tunnelForm(t, done) {
    const edit = !!t;
    const p = uid('tf');
    const err = h('div', { class: 'alert', role: 'alert', id: `${p}-err` });
    const field = (label, input, hint) => {
      if (hint) input.setAttribute('aria-describedby', `${input.id}-hint`);
      return h('div', { class: 'field' }, h('label', { for: input.id }, label), input,
        hint && h('small', { id: `${input.id}-hint`, class: 'muted' }, hint));
    };
    const inp = (name, attrs) => h('input', Object.assign({ id: `${p}-${name}`, name, autocomplete: 'off', spellcheck: 'false' }, attrs));
    const name = inp('name', { required: true, value: t && t.name, readonly: edit });
    const target = inp('target', { required: true, value: t && t.target, placeholder: '127.0.0.1:3000' });
    const proto = h('select', { id: `${p}-protocol`, name: 'protocol' },
      ['http', 'tcp', 'tls', 'udp'].map((x) => h('option', { value: x, selected: ((t && t.protocol) || 'http') === x }, x)));
    const hosts = inp('hostnames', { value: ((t && t.hostnames) || []).join(', '), placeholder: 'app.example.com, api.example.com' });
    const submit = h('button', { type: 'submit', class: 'btn primary' }, edit ? 'Save' : 'Add tunnel');
    const form = h('form', { class: 'tunnel-form', 'aria-labelledby': `${p}-t` },
      h('h3', { id: `${p}-t` }, edit ? `Edit tunnel ${t.name}` : 'Add tunnel'),
      h('div', { class: 'form-grid' },
        field('Name', name, edit ? 'The name cannot be changed.' : 'A unique name, e.g. “web”.'),
        field('Target (host:port)', target, 'Local address the tunnel forwards to.'),
        field('Protocol', proto),
        field('Hostnames', hosts, 'Comma-separated; leave empty for a generated one.')),
      err,
      h('div', { class: 'actions' }, submit,
        h('button', { type: 'button', class: 'btn', onclick: () => done(false) }, 'Cancel')));
    form.addEventListener('submit', async (e) => {
      e.preventDefault();
      for (const el of form.querySelectorAll('[aria-invalid]')) {
        el.removeAttribute('aria-invalid');
        el.setAttribute('aria-describedby', (el.getAttribute('aria-describedby') || '').replace(`${p}-err`, '').trim());
      }
      setText(err, '');
      const body = {
        name: name.value.trim(), target: target.value.trim(), protocol: proto.value,
        hostnames: hosts.value.split(',').map((x) => x.trim()).filter(Boolean),
      };
      submit.setAttribute('aria-busy', 'true');
      try {
        const r = await api(edit ? 'PUT' : 'POST', edit ? `/api/tunnels/${enc(t.name)}` : '/api/tunnels', body);
        const nt = r && (r.tunnel || r);
        if (nt && nt.name) replaceTunnel(nt);
        done(true);
        refreshTunnels();
      } catch (ex) {
        setText(err, ex.message);
        const f = ex.field && [name, target, proto, hosts].find((el) => ex.field === el.name || String(ex.field).startsWith(el.name));
        if (f) {
          f.setAttribute('aria-invalid', 'true');
          f.setAttribute('aria-describedby', `${f.getAttribute('aria-describedby') || ''} ${p}-err`.trim());
          f.focus();
        }
      } finally { submit.removeAttribute('aria-busy'); }
    });
    return form;
  }
  function toggleAdd() {
    const wrap = $('add-form-wrap');
    const btn = $('add-tunnel');
    if (!wrap.hidden) { wrap.hidden = true; wrap.replaceChildren(); btn.setAttribute('aria-expanded', 'false'); return; }
    wrap.replaceChildren(tunnelForm(null, () => {
      wrap.hidden = true; wrap.replaceChildren(); btn.setAttribute('aria-expanded', 'false'); btn.focus();
    }));
    wrap.hidden = false;
    btn.setAttribute('aria-expanded', 'true');
    wrap.querySelector('input').focus();
  }

  // ---------- inspector list ----------
  const rowKey = (id) => String(id);
  function parseFilter(q) {
    const terms = [];
    for (const tok of q.trim().toLowerCase().split(/\s+/).filter(Boolean)) {
      const m = tok.match(/^(status|method|tunnel|client|path|host):(.*)$/);
      terms.push(m ? { k: m[1], v: m[2] } : { k: '', v: tok });
    }
    return terms;
  }
  function matches(r, terms) {
    if (S.tunnelSel && r.tunnel !== S.tunnelSel) return false;
    const st = r.status == null ? '' : String(r.status);
    for (const { k, v } of terms) {
      if (!v) continue;
      if (k === 'status') {
        if (v === 'none' || v === '-' || v === '—' || v === 'error') { if (r.status != null && !(v === 'error' && r.error)) return false; continue; }
        const re = new RegExp('^' + v.replace(/[^0-9x]/g, '').replace(/x/g, '\\d') + '$');
        if (!re.test(st)) return false;
      } else if (k === 'method') { if (String(r.method || '').toLowerCase() !== v) return false; }
      else if (k === 'tunnel') { if (String(r.tunnel || '').toLowerCase() !== v) return false; }
      else if (k) { if (!String(r[k] || '').toLowerCase().includes(v)) return false; }
      else {
        const hay = [r.method, r.path, st, r.tunnel, r.client, r.host].join(' ').toLowerCase();
        if (!hay.includes(v)) return false;
      }
    }
    return true;
  }
  function rowFor(r) {
    const id = rowKey(r.id);
    const td = (cls, label, ...c) => h('td', { class: cls, 'data-label': label }, ...c);
    const tr = h('tr', { 'data-id': id, 'data-status': r.status == null ? '' : r.status, class: r.error ? 'has-error' : null },
      td('c-time', 'Time', h('time', { datetime: r.started || null, title: r.started || null }, fmtTime(r.started))),
      td('c-tunnel', 'Tunnel', r.tunnel || ''),
      td('c-method', 'Method', h('span', { class: 'method' }, r.method || '')),
      td('c-path', 'Path', h('a', { href: `#/inspect/${enc(id)}`, class: 'path', title: r.path || '' }, r.path || '/'),
        r.replay_of != null && h('span', { class: 'tag', title: `Replay of #${r.replay_of}` }, 'replay')),
      td('c-status', 'Status', statusBadge(r.status, r.error)),
      td('c-dur', 'Duration', fmtMs(r.duration_ms)),
      td('c-size', 'Size', fmtBytes(r.response_bytes)),
      td('c-client', 'Client', r.client || ''));
    if (S.route.id != null && rowKey(S.route.id) === id) tr.setAttribute('aria-selected', 'true');
    return tr;
  }
  function renderList() {
    const terms = parseFilter(S.filter);
    const frag = document.createDocumentFragment();
    let n = 0;
    for (const r of S.reqs) {
      if (!matches(r, terms)) continue;
      frag.append(rowFor(r));
      if (++n >= MAX_ROWS) break;
    }
    const focusedId = document.activeElement && document.activeElement.closest && document.activeElement.closest('#req-body tr');
    $('req-body').replaceChildren(frag);
    if (focusedId) {
      const a = document.querySelector(`#req-body tr[data-id="${CSS.escape(focusedId.dataset.id)}"] a`);
      if (a) a.focus();
    }
    updateCount();
  }
  function updateCount() {
    const shown = $('req-body').children.length;
    const total = S.reqs.length;
    const filtered = S.filter.trim() || S.tunnelSel;
    setText($('req-count'), filtered ? `${shown} of ${total} requests` : `${total} request${total === 1 ? '' : 's'}`);
    $('req-empty').hidden = shown > 0;
    setText($('req-empty'), total ? 'No requests match the filter.' : 'No requests yet. Send a request to one of your tunnels’ public URLs.');
  }
  function sortReqs() {
    const num = (x) => (typeof x === 'number' ? x : Number(x));
    S.reqs.sort((a, b) => {
      const ta = Date.parse(a.started) || 0, tb = Date.parse(b.started) || 0;
      if (ta !== tb) return tb - ta;
      const na = num(a.id), nb = num(b.id);
      return isNaN(na) || isNaN(nb) ? String(b.id).localeCompare(String(a.id)) : nb - na;
    });
  }
  function mergeReqs(list) {
    for (const r of list) {
      const k = rowKey(r.id);
      if (S.byId.has(k)) Object.assign(S.byId.get(k), r);
      else { S.byId.set(k, r); S.reqs.push(r); }
    }
    sortReqs();
    trimReqs();
    renderList();
  }
  function trimReqs() {
    while (S.reqs.length > MAX_KEEP) S.byId.delete(rowKey(S.reqs.pop().id));
  }
  function addRequest(r) {
    if (!r || r.id == null) return;
    const k = rowKey(r.id);
    const tb = $('req-body');
    const existing = tb.querySelector(`tr[data-id="${CSS.escape(k)}"]`);
    if (S.byId.has(k)) {
      Object.assign(S.byId.get(k), r);
      if (existing) {
        const hadFocus = existing.contains(document.activeElement);
        const nr = rowFor(S.byId.get(k));
        existing.replaceWith(nr);
        if (hadFocus) nr.querySelector('a').focus();
      }
      return;
    }
    S.byId.set(k, r);
    S.reqs.unshift(r);
    trimReqs();
    if (matches(r, parseFilter(S.filter))) {
      tb.prepend(rowFor(r));
      while (tb.children.length > MAX_ROWS) tb.lastElementChild.remove();
    }
    updateCount();
  }
  function clearList() {
    S.reqs = [];
    S.byId.clear();
    renderList();
  }
  async function loadRequests() {
    const q = S.tunnelSel ? `?tunnel=${enc(S.tunnelSel)}&limit=${MAX_ROWS}` : `?limit=${MAX_ROWS}`;
    try {
      const d = await api('GET', `/api/requests${q}`);
      mergeReqs((d && d.requests) || []);
      setText($('list-alert'), '');
    } catch (e) { setText($('list-alert'), `Could not load requests: ${e.message}`); }
  }
  function updateTunnelSelect() {
    const sel = $('tunnel-sel');
    const names = [...new Set(S.tunnels.map((t) => t.name))];
    if (S.tunnelSel && !names.includes(S.tunnelSel)) names.push(S.tunnelSel);
    const cur = [...sel.options].slice(1).map((o) => o.value);
    if (cur.join('\n') === names.join('\n')) return;
    sel.replaceChildren(...kids(h('option', { value: '' }, 'All tunnels'), names.map((n) => h('option', { value: n }, n))));
    sel.value = S.tunnelSel;
  }
  function markSelected() {
    for (const tr of document.querySelectorAll('#req-body tr[aria-selected]')) tr.removeAttribute('aria-selected');
    if (S.route.id == null) return;
    const tr = document.querySelector(`#req-body tr[data-id="${CSS.escape(rowKey(S.route.id))}"]`);
    if (tr) tr.setAttribute('aria-selected', 'true');
  }

  // ---------- detail ----------
  let detailSeq = 0;
  async function loadDetail(id, reveal, focus) {
    const pane = $('detail');
    const seq = ++detailSeq;
    if (id == null) {
      S.detail = null;
      pane.replaceChildren(h('p', { class: 'muted placeholder' }, 'Select a request to see its headers and body.'));
      return;
    }
    pane.setAttribute('aria-busy', 'true');
    try {
      const d = await api('GET', `/api/requests/${enc(id)}${reveal ? '?reveal=1' : ''}`, undefined, reveal);
      if (seq !== detailSeq) return;
      S.detail = d;
      S.revealed = !!reveal;
      renderDetail(d);
    } catch (e) {
      if (seq !== detailSeq) return;
      pane.replaceChildren(backLink(), h('h2', { id: 'detail-title', tabindex: '-1' }, `Request #${id}`),
        h('p', { class: 'alert', role: 'alert' }, e.status === 404 ? 'This request is no longer available (it may have been cleared).' : `Could not load the request: ${e.message}`));
    } finally { pane.removeAttribute('aria-busy'); }
    if (focus && seq === detailSeq) { const t = $('detail-title'); if (t) t.focus(); }
  }
  const backLink = () => h('a', { href: '#/inspect', class: 'back' }, '← All requests');

  function renderDetail(d) {
    const pane = $('detail');
    const masked = new Set((d.masked || []).map((x) => String(x).toLowerCase()));
    const status = h('div', { class: 'status-msg', role: 'status' });
    const alert = h('div', { class: 'alert', role: 'alert' });
    const extra = h('div', { class: 'extra' });
    if (S.flash && rowKey(S.flash.id) === rowKey(d.id)) { setText(status, S.flash.text); S.flash = null; }
    const btn = (label, fn, attrs) => h('button', Object.assign({ type: 'button', class: 'btn', onclick: fn }, attrs || {}), label);
    const editBtn = btn('Edit and replay', () => {
      if (editBtn.getAttribute('aria-expanded') === 'true') { extra.replaceChildren(); editBtn.setAttribute('aria-expanded', 'false'); return; }
      extra.replaceChildren(replayForm(d, status, alert, () => { extra.replaceChildren(); editBtn.setAttribute('aria-expanded', 'false'); editBtn.focus(); }));
      editBtn.setAttribute('aria-expanded', 'true');
      extra.querySelector('input').focus();
    }, { 'aria-expanded': 'false', 'aria-controls': 'detail-extra' });
    extra.id = 'detail-extra';
    const actions = h('div', { class: 'actions' },
      btn('Replay', (e) => replay(d, null, status, alert, e.currentTarget), { class: 'btn primary' }),
      editBtn,
      btn('Copy as curl', () => copyCurl(d, status, alert, extra)),
      masked.size > 0 && (S.revealed
        ? btn('Hide secrets', () => loadDetail(d.id, false))
        : btn('Reveal secrets', () => loadDetail(d.id, true), { title: `Show the values of: ${[...masked].join(', ')}` })));
    const summary = h('p', { class: 'summary' },
      statusBadge(d.status, d.error), ' ', h('span', null, fmtMs(d.duration_ms)), ' · ',
      h('time', { datetime: d.started || null, title: d.started || null }, fmtTime(d.started)),
      ' · tunnel ', h('b', null, d.tunnel || '?'), ' · from ', h('span', null, d.client || '?'),
      d.replay_of != null && [' · replay of ', h('a', { href: `#/inspect/${enc(String(d.replay_of))}` }, `#${d.replay_of}`)]);
    const req = d.request || {};
    const resp = d.response;
    pane.replaceChildren(...kids(
      backLink(),
      h('h2', { id: 'detail-title', tabindex: '-1', class: 'detail-title' },
        h('span', { class: 'method' }, d.method || ''), ' ', h('span', { class: 'path' }, d.path || '/')),
      summary,
      d.public_url && h('p', { class: 'url' }, h('code', null, d.public_url)),
      d.error && h('p', { class: 'error-text' }, h('b', null, 'Error: '), d.error),
      actions, status, alert, extra,
      S.revealed && h('p', { class: 'note' }, 'Secret header values are shown.'),
      h('section', { class: 'msg', 'aria-labelledby': 'det-req' },
        h('h3', { id: 'det-req' }, 'Request'),
        headersTable(req.headers, masked, 'Request headers'),
        h('h4', null, 'Body'), renderBody(req.body)),
      h('section', { class: 'msg', 'aria-labelledby': 'det-resp' },
        h('h3', { id: 'det-resp' }, 'Response', resp && resp.status != null ? [' ', statusBadge(resp.status)] : null),
        resp ? [headersTable(resp.headers, masked, 'Response headers'), h('h4', null, 'Body'), renderBody(resp.body)]
          : h('p', { class: 'muted' }, 'No response was received.'))));
    markSelected();
  }
  function headersTable(headers, masked, caption) {
    if (!headers || !headers.length) return h('p', { class: 'muted' }, 'No headers.');
    return h('div', { class: 'table-wrap' }, h('table', { class: 'kv' },
      h('caption', { class: 'sr-only' }, caption),
      h('thead', null, h('tr', null, h('th', { scope: 'col' }, 'Name'), h('th', { scope: 'col' }, 'Value'))),
      h('tbody', null, headers.map(([n, v]) => {
        const isMasked = masked.has(String(n).toLowerCase()) && v === MASK;
        return h('tr', null, h('th', { scope: 'row' }, n),
          h('td', { class: isMasked ? 'masked' : null, title: isMasked ? 'Hidden; use “Reveal secrets”' : null },
            v, isMasked && h('span', { class: 'sr-only' }, ' (hidden)')));
      }))));
  }
  function b64bytes(b64) {
    const bin = atob(String(b64).replace(/\s+/g, ''));
    const out = new Uint8Array(bin.length);
    for (let i = 0; i < bin.length; i++) out[i] = bin.charCodeAt(i);
    return out;
  }
  function hexDump(bytes, limit) {
    const n = Math.min(bytes.length, limit);
    const lines = [];
    for (let off = 0; off < n; off += 16) {
      let hex = '', asc = '';
      for (let i = 0; i < 16; i++) {
        const j = off + i;
        if (j < n) {
          const c = bytes[j];
          hex += c.toString(16).padStart(2, '0') + ' ';
          asc += c >= 0x20 && c < 0x7f ? String.fromCharCode(c) : '.';
        } else hex += '   ';
        if (i === 7) hex += ' ';
      }
      lines.push(`${off.toString(16).padStart(8, '0')}  ${hex} |${asc}|`);
    }
    return lines.join('\n');
  }
  function renderBody(b) {
    const wrap = h('div', { class: 'body-wrap' });
    if (!b || (!b.size && !b.text && !b.base64)) { wrap.append(h('p', { class: 'muted' }, 'No body.')); return wrap; }
    const ct = String(b.content_type || '').toLowerCase();
    const size = b.size != null ? b.size : 0;
    wrap.append(h('p', { class: 'muted body-meta' }, `${b.content_type || 'no content type'} · ${fmtBytes(size)}`));
    let shown = 0;
    const notes = [];
    if (b.text != null) {
      shown = new TextEncoder().encode(b.text).length;
      if (/[/+]json\b/.test(ct) || ct === 'json') {
        let pretty = null;
        try { pretty = JSON.stringify(JSON.parse(b.text), null, 2); } catch (_) { notes.push(b.truncated ? 'Truncated JSON, shown as captured.' : 'Not valid JSON, shown as-is.'); }
        wrap.append(h('pre', { class: 'body', tabindex: '0' }, pretty != null ? pretty : b.text));
      } else if (ct.startsWith('application/x-www-form-urlencoded')) {
        const params = [...new URLSearchParams(b.text)];
        if (params.length) {
          wrap.append(h('div', { class: 'table-wrap' }, h('table', { class: 'kv' },
            h('caption', { class: 'sr-only' }, 'Form fields'),
            h('thead', null, h('tr', null, h('th', { scope: 'col' }, 'Key'), h('th', { scope: 'col' }, 'Value'))),
            h('tbody', null, params.map(([k, v]) => h('tr', null, h('th', { scope: 'row' }, k), h('td', null, v)))))));
        }
        wrap.append(h('details', null, h('summary', null, 'Raw'), h('pre', { class: 'body', tabindex: '0' }, b.text)));
      } else {
        wrap.append(h('pre', { class: 'body', tabindex: '0' }, b.text));
      }
    } else if (b.base64 != null) {
      let bytes;
      try { bytes = b64bytes(b.base64); } catch (_) { bytes = null; }
      if (!bytes) wrap.append(h('p', { class: 'alert' }, 'The body could not be decoded.'));
      else {
        shown = Math.min(bytes.length, HEX_LIMIT);
        notes.push(`Binary body: hex dump${bytes.length > HEX_LIMIT ? ` of the first ${HEX_LIMIT} bytes` : ''}.`);
        wrap.append(h('pre', { class: 'body hex', tabindex: '0', 'aria-label': 'Hex dump' }, hexDump(bytes, HEX_LIMIT)));
      }
    }
    if (b.truncated || shown < size) notes.push(`Showing ${shown} of ${size} bytes${b.truncated ? ' (truncated)' : ''}.`);
    if (notes.length) wrap.insertBefore(h('p', { class: 'note' }, notes.join(' ')), wrap.children[1] || null);
    return wrap;
  }

  // ---------- replay ----------
  async function replay(d, body, status, alert, busyEl) {
    setText(status, '');
    setText(alert, '');
    if (busyEl) busyEl.setAttribute('aria-busy', 'true');
    try {
      const r = await api('POST', `/api/requests/${enc(d.id)}/replay`, body || undefined);
      if (r && r.id != null) {
        addRequest(r);
        S.flash = { id: r.id, text: `Replay of #${d.id} sent as #${r.id}; status ${r.status == null ? '—' : r.status}${r.error ? ` (${r.error})` : ''}.` };
        location.hash = `#/inspect/${enc(String(r.id))}`;
      } else setText(status, 'Replay sent.');
      return true;
    } catch (e) {
      setText(alert, `Replay failed${e.status ? ` (${e.status})` : ''}: ${e.message}`);
      return false;
    } finally { if (busyEl) busyEl.removeAttribute('aria-busy'); }
  }
  function replayForm(d, status, alert, close) {
    const p = uid('rf');
    const req = d.request || {};
    const body = req.body || {};
    const hdrs = (req.headers || []).filter(([n]) => !/^(content-length|transfer-encoding)$/i.test(n));
    const method = h('input', { id: `${p}-m`, name: 'method', value: d.method || 'GET', required: true, autocomplete: 'off', spellcheck: 'false', list: `${p}-ml` });
    const path = h('input', { id: `${p}-p`, name: 'path', value: d.path || '/', required: true, autocomplete: 'off', spellcheck: 'false' });
    const headers = h('textarea', { id: `${p}-h`, name: 'headers', rows: Math.min(12, hdrs.length + 2), spellcheck: 'false', 'aria-describedby': `${p}-hh` },
      hdrs.map(([n, v]) => `${n}: ${v}`).join('\n'));
    const binary = body.base64 != null;
    const bodyTa = h('textarea', { id: `${p}-b`, name: 'body', rows: 6, spellcheck: 'false', disabled: binary, 'aria-describedby': `${p}-bh` },
      binary ? '' : body.text || '');
    const bodyHint = binary ? 'The original body is binary and is sent unchanged.'
      : body.truncated ? 'Only the start of the body was kept: edit it to replay (the whole original cannot be sent).' : 'Sent as-is.';
    const submit = h('button', { type: 'submit', class: 'btn primary' }, 'Send replay');
    const form = h('form', { class: 'replay-form', 'aria-labelledby': `${p}-t` },
      h('h3', { id: `${p}-t` }, 'Edit and replay'),
      h('datalist', { id: `${p}-ml` }, ['GET', 'POST', 'PUT', 'PATCH', 'DELETE', 'HEAD', 'OPTIONS'].map((m) => h('option', { value: m }))),
      h('div', { class: 'form-grid' },
        h('div', { class: 'field' }, h('label', { for: method.id }, 'Method'), method),
        h('div', { class: 'field grow' }, h('label', { for: path.id }, 'Path'), path)),
      h('div', { class: 'field' }, h('label', { for: headers.id }, 'Headers'), headers,
        h('small', { id: `${p}-hh`, class: 'muted' }, `One “Name: value” per line. ${MASK} keeps the original secret value.`)),
      h('div', { class: 'field' }, h('label', { for: bodyTa.id }, 'Body'), bodyTa, h('small', { id: `${p}-bh`, class: 'muted' }, bodyHint)),
      h('div', { class: 'actions' }, submit, h('button', { type: 'button', class: 'btn', onclick: close }, 'Cancel')));
    form.addEventListener('submit', async (e) => {
      e.preventDefault();
      headers.removeAttribute('aria-invalid');
      const list = [];
      const lines = headers.value.split(/\r?\n/);
      for (let i = 0; i < lines.length; i++) {
        const line = lines[i];
        if (!line.trim()) continue;
        const c = line.indexOf(':');
        if (c <= 0) {
          headers.setAttribute('aria-invalid', 'true');
          setText(alert, `Headers, line ${i + 1}: expected “Name: value”.`);
          headers.focus();
          return;
        }
        list.push([line.slice(0, c).trim(), line.slice(c + 1).trim()]);
      }
      const payload = { method: method.value.trim().toUpperCase(), path: path.value.trim(), headers: list };
      if (!binary && !(body.truncated && bodyTa.value === (body.text || ''))) payload.body = bodyTa.value;
      await replay(d, payload, status, alert, submit);
    });
    return form;
  }

  // ---------- copy as curl ----------
  const shq = (v) => `'${String(v).replace(/'/g, `'\\''`)}'`;
  function curlFor(d) {
    const skip = /^(host|content-length|connection|transfer-encoding)$|^(x-forwarded-|portway-)/i;
    const req = d.request || {};
    const url = d.public_url || `http://${d.host || 'localhost'}${d.path || '/'}`;
    const m = d.method || 'GET';
    // Everything quoted: a method is any token, and tokens may hold ` $ | & for a shell.
    const parts = ['curl', '-X', shq(m), shq(url)];
    for (const [n, v] of req.headers || []) if (!skip.test(n)) parts.push('-H', shq(`${n}: ${v}`));
    const b = req.body || {};
    let prefix = '';
    // --data-raw: a body starting with @ is data, not a file for curl to read and send.
    if (b.text != null && b.text !== '') parts.push('--data-raw', shq(b.text));
    else if (b.base64) { prefix = `printf %s ${shq(String(b.base64).replace(/\s+/g, ''))} | base64 -d | `; parts.push('--data-binary', '@-'); }
    return prefix + parts.join(' ');
  }
  async function copyCurl(d, status, alert, extra) {
    setText(status, '');
    setText(alert, '');
    const cmd = curlFor(d);
    const masked = (d.masked || []).length > 0 && !S.revealed &&
      ((d.request || {}).headers || []).some(([, v]) => v === MASK);
    const caveats = [];
    if (masked) caveats.push('Secret header values are placeholders; use “Reveal secrets” first to copy the real values.');
    if (((d.request || {}).body || {}).truncated) caveats.push('The body was truncated when captured.');
    let ok = false;
    if (navigator.clipboard && window.isSecureContext) {
      try {
        await Promise.race([navigator.clipboard.writeText(cmd),
          new Promise((_, rej) => setTimeout(() => rej(new Error('timeout')), 1500))]);
        ok = true;
      } catch (_) { ok = false; }
    }
    const p = uid('curl');
    const ta = h('textarea', { id: p, class: 'curl', readonly: true, rows: 4, spellcheck: 'false' }, cmd);
    extra.replaceChildren(h('div', { class: 'field' },
      h('label', { for: p }, ok ? 'curl command (copied)' : 'curl command — select and copy (Ctrl+C / ⌘C)'), ta));
    setText(status, [ok ? 'Copied the curl command to the clipboard.' : 'The clipboard is not available; the command is shown below.', ...caveats].join(' '));
    if (!ok) { ta.focus(); ta.select(); }
  }

  // ---------- live stream ----------
  let es = null;
  let retry = null;
  let wasDown = false;
  function connect() {
    if (es) es.close();
    es = new EventSource('/api/events');
    es.onopen = () => {
      setLive(true);
      if (wasDown) { wasDown = false; loadAll(); }
    };
    es.onerror = () => {
      setLive(false);
      wasDown = true;
      if (es.readyState === EventSource.CLOSED) { clearTimeout(retry); retry = setTimeout(connect, 3000); }
    };
    es.addEventListener('request', (e) => { const r = safeParse(e.data); if (r) addRequest(r); });
    es.addEventListener('tunnels', (e) => {
      const d = safeParse(e.data);
      if (d) setTunnels(Array.isArray(d) ? d : d.tunnels);
    });
    // The stream outran this page: the list is read again.
    es.addEventListener('lagged', () => { loadRequests(); });
  }
  async function loadAll() {
    const info = api('GET', '/api/info').then((i) => { S.info = i; renderInfo(); })
      .catch((e) => { setText($('device-name'), `agent unreachable (${e.message})`); });
    const tun = api('GET', '/api/tunnels').then((d) => setTunnels((d && d.tunnels) || []))
      .catch((e) => { $('tunnels-msg').hidden = false; setText($('tunnels-msg'), `Could not load tunnels: ${e.message}`); });
    await Promise.all([info, tun, loadRequests()]);
  }

  // ---------- wiring ----------
  function init() {
    $('skip').addEventListener('click', (e) => { e.preventDefault(); $('main').focus(); });
    $('add-tunnel').addEventListener('click', toggleAdd);
    let ft = null;
    $('filter').addEventListener('input', (e) => {
      clearTimeout(ft);
      ft = setTimeout(() => { S.filter = e.target.value; renderList(); }, 120);
    });
    $('tunnel-sel').addEventListener('change', (e) => { S.tunnelSel = e.target.value; renderList(); loadRequests(); });
    $('clear').addEventListener('click', async () => {
      setText($('list-alert'), '');
      try { await api('DELETE', '/api/requests'); clearList(); } catch (e) { setText($('list-alert'), `Could not clear: ${e.message}`); }
    });
    $('req-body').addEventListener('click', (e) => {
      if (e.target.closest('a')) return;
      const sel = window.getSelection && String(window.getSelection());
      if (sel) return; // let people select text in rows
      const tr = e.target.closest('tr[data-id]');
      if (tr) location.hash = `#/inspect/${enc(tr.dataset.id)}`;
    });
    window.addEventListener('hashchange', () => route(true));
    route(false);
    setLive(false);
    setText($('live'), 'connecting…');
    loadAll();
    if (window.EventSource) connect(); else setText($('live'), 'no live updates');
  }
  if (document.readyState === 'loading') document.addEventListener('DOMContentLoaded', init); else init();
})();
