// clinflow trial-monitor dashboard.
//
// Plain ES2020, no dependencies, nothing loaded from elsewhere. The server
// embeds this file and serves it at /ui/app.js.
//
// Invariants:
// - Stored data reaches the page only through textContent / setAttribute
//   (never innerHTML), so nothing a site or a device sent can run as markup.
// - Every API call sends the bearer token kept in sessionStorage; a 401 from
//   any call forgets the token and returns to the sign-in form with a message.
// - Elements that tests read carry a data-testid; views expose their progress
//   in data-state ("loading" | "ready" | "error") so tests wait on the DOM.
'use strict';

(() => {
  const TOKEN_KEY = 'clinflow.token';
  const TRIAL_KEY = 'clinflow.trial';
  const MESSAGE_KEY = 'clinflow.signin-message';
  const REFRESH_MS = 30_000;
  const SEARCH_DEBOUNCE_MS = 250;
  const SVG_NS = 'http://www.w3.org/2000/svg';

  const SECTIONS = [
    ['enrolment', 'Enrolment'],
    ['adverse_events', 'Adverse events'],
    ['visits', 'Visits'],
    ['data_quality', 'Data quality'],
    ['ingest', 'Ingest'],
  ];
  const SECTION_NAMES = new Map(SECTIONS);

  const PHASES = {
    'n-a': 'N/A',
    'early-phase-1': 'Early Phase 1',
    'phase-1': 'Phase 1',
    'phase-1-phase-2': 'Phase 1/Phase 2',
    'phase-2': 'Phase 2',
    'phase-2-phase-3': 'Phase 2/Phase 3',
    'phase-3': 'Phase 3',
    'phase-4': 'Phase 4',
  };

  const SEVERITY_ORDER = ['mild', 'moderate', 'severe', 'life-threatening', 'fatal'];
  const MONTHS = ['Jan', 'Feb', 'Mar', 'Apr', 'May', 'Jun', 'Jul', 'Aug', 'Sep', 'Oct', 'Nov', 'Dec'];
  const WEEKDAYS = ['Mon', 'Tue', 'Wed', 'Thu', 'Fri', 'Sat', 'Sun'];

  const state = {
    trials: [],
    trial: null, // the selected trial id
    view: null, // 'dashboard' | 'subject'
    dashboard: null, // the last dashboard JSON rendered
    dashboardTrial: null, // the trial whose lists (sites, subjects) are shown
    dashReq: 0,
    dashSeq: 0,
    lastUpdate: 0,
    refreshTimer: null,
    siteReq: 0,
    siteAbort: null,
    siteDebounce: null,
    siteNext: null,
    siteQuery: '',
    subjectReq: 0,
    subjectsReq: 0,
    subjects: [],
    siteInfo: new Map(), // site id -> {name, timezone}
    signingOut: false,
  };

  const $ = (id) => document.getElementById(id);

  // ---------------------------------------------------------------- DOM helpers

  function setAttrs(node, attrs) {
    for (const [k, v] of Object.entries(attrs || {})) {
      if (v === null || v === undefined || v === false) continue;
      if (k === 'text') node.textContent = String(v);
      else if (k.startsWith('on') && typeof v === 'function') node.addEventListener(k.slice(2), v);
      else node.setAttribute(k, v === true ? '' : String(v));
    }
    return node;
  }

  function appendAll(node, children) {
    for (const c of children.flat(Infinity)) {
      if (c === null || c === undefined || c === false) continue;
      node.append(c instanceof Node ? c : document.createTextNode(String(c)));
    }
    return node;
  }

  /** An HTML element; strings among the children become text nodes. */
  function h(tag, attrs, ...children) {
    return appendAll(setAttrs(document.createElement(tag), attrs), children);
  }

  /** An SVG element. */
  function s(tag, attrs, ...children) {
    return appendAll(setAttrs(document.createElementNS(SVG_NS, tag), attrs), children);
  }

  function setText(id, text, value) {
    const node = $(id);
    node.textContent = text;
    if (value === undefined || value === null) node.removeAttribute('data-value');
    else node.setAttribute('data-value', String(value));
  }

  // ---------------------------------------------------------------- formatting

  const formatters = new Map();
  /** A number for people: grouped thousands, at most `digits` decimals, "—" when missing. */
  function fmtNum(n, digits = 0) {
    const x = typeof n === 'string' && n.trim() !== '' ? Number(n) : n;
    if (typeof x !== 'number' || !Number.isFinite(x)) return '—';
    let f = formatters.get(digits);
    if (!f) {
      f = new Intl.NumberFormat('en-US', { maximumFractionDigits: digits, minimumFractionDigits: 0 });
      formatters.set(digits, f);
    }
    return f.format(x);
  }

  function num(n) {
    const x = Number(n);
    return Number.isFinite(x) ? x : 0;
  }

  function plural(n, one, many) {
    return `${fmtNum(n)} ${n === 1 ? one : many || one + 's'}`;
  }

  /** "2026-03-02T14:30:00Z" -> "2026-03-02 14:30 UTC" (the raw text when unparsable). */
  function fmtInstant(text) {
    if (!text) return '—';
    const d = new Date(text);
    if (Number.isNaN(d.getTime())) return String(text);
    return `${d.toISOString().slice(0, 16).replace('T', ' ')} UTC`;
  }

  /** "2026-03-02T14:30:00Z" -> "2026-03-02 14:30", for columns headed "(UTC)". */
  function fmtInstantShort(text) {
    if (!text) return '—';
    const d = new Date(text);
    if (Number.isNaN(d.getTime())) return String(text);
    return d.toISOString().slice(0, 16).replace('T', ' ');
  }

  function fmtClock(date) {
    const p = (n) => String(n).padStart(2, '0');
    return `${p(date.getHours())}:${p(date.getMinutes())}:${p(date.getSeconds())}`;
  }

  /** A "YYYY-MM-DD" date as a UTC Date (null when unparsable). */
  function parseDay(text) {
    const m = /^(\d{4})-(\d{2})-(\d{2})/.exec(String(text || ''));
    if (!m) return null;
    const d = new Date(Date.UTC(+m[1], +m[2] - 1, +m[3]));
    return Number.isNaN(d.getTime()) ? null : d;
  }

  function dayKey(d) {
    return d.toISOString().slice(0, 10);
  }

  function addDays(d, n) {
    return new Date(d.getTime() + n * 86_400_000);
  }

  function shortDay(text) {
    const d = parseDay(text);
    return d ? `${d.getUTCDate()} ${MONTHS[d.getUTCMonth()]}` : String(text || '');
  }

  function siteName(id) {
    const info = state.siteInfo.get(id);
    return info && info.name ? info.name : String(id || '—');
  }

  /** The subject id without the "TRIAL-" prefix, for tight spaces. */
  function shortSubject(subject) {
    const prefix = `${state.trial}-`;
    const text = String(subject || '');
    return text.startsWith(prefix) && text.length > prefix.length ? text.slice(prefix.length) : text;
  }

  function subjectHref(subject, trial = state.trial) {
    return `#/trial/${encodeURIComponent(trial)}/subject/${encodeURIComponent(subject)}`;
  }

  function subjectLink(subject, attrs = {}) {
    return h('a', { href: subjectHref(subject), ...attrs }, attrs.text === undefined ? String(subject) : null);
  }

  // ---------------------------------------------------------------- API

  class AuthError extends Error {}

  class ApiError extends Error {
    constructor(status, message) {
      super(message);
      this.status = status;
    }
  }

  async function api(path, { signal } = {}) {
    const token = sessionStorage.getItem(TOKEN_KEY);
    if (!token) {
      signOut('Sign in to continue.', true);
      throw new AuthError('not signed in');
    }
    let resp;
    try {
      resp = await fetch(path, {
        headers: { Authorization: `Bearer ${token}`, Accept: 'application/json' },
        cache: 'no-cache', // revalidate every time: the server's ETags make that a cheap 304
        credentials: 'omit',
        signal,
      });
    } catch (e) {
      if (e && e.name === 'AbortError') throw e;
      if (e instanceof TypeError && /header|ISO-8859-1|Invalid/i.test(e.message)) {
        signOut('That token contains characters a token cannot have. Check it and sign in again.', true);
        throw new AuthError('bad token');
      }
      throw new ApiError(0, `the server could not be reached (${e && e.message ? e.message : e})`);
    }
    if (resp.status === 401) {
      signOut('The server did not accept the token (401 Unauthorized). Check it, or ask for a new one, and sign in again.', true);
      throw new AuthError('401');
    }
    if (!resp.ok) {
      let detail = '';
      try {
        const body = await resp.json();
        detail = body && (body.detail || body.title || body.message) ? String(body.detail || body.title || body.message) : '';
      } catch (_) {
        /* not JSON */
      }
      throw new ApiError(resp.status, `${resp.status} ${resp.statusText || ''}`.trim() + (detail ? `: ${detail}` : ''));
    }
    try {
      return await resp.json();
    } catch (e) {
      throw new ApiError(resp.status, `the server sent a response that is not JSON (${e.message})`);
    }
  }

  function errorText(e) {
    return e && e.message ? e.message : String(e);
  }

  // ---------------------------------------------------------------- sign-in / sign-out

  function showSignIn(message) {
    $('app-view').hidden = true;
    $('signin-view').hidden = false;
    const msg = $('signin-message');
    msg.textContent = message || '';
    msg.hidden = !message;
    $('signin-token').focus();
  }

  /**
   * Forget the token and go back to the sign-in form. The page reloads so that
   * nothing of the previous session's data stays in the DOM; the message
   * survives the reload in sessionStorage. `keepRoute` keeps the hash, so a
   * user whose token expired comes back to the same view.
   */
  function signOut(message, keepRoute) {
    if (state.signingOut) return;
    state.signingOut = true;
    clearTimeout(state.refreshTimer);
    sessionStorage.removeItem(TOKEN_KEY);
    if (message) sessionStorage.setItem(MESSAGE_KEY, message);
    else sessionStorage.removeItem(MESSAGE_KEY);
    if (keepRoute) location.reload();
    else location.replace(location.pathname + location.search);
  }

  async function onSignIn(ev) {
    ev.preventDefault();
    const input = $('signin-token');
    const token = input.value.trim();
    if (!token) {
      showSignIn('Enter a token.');
      return;
    }
    sessionStorage.setItem(TOKEN_KEY, token);
    input.value = '';
    await start();
  }

  // ---------------------------------------------------------------- start and routing

  async function start() {
    $('signin-view').hidden = true;
    $('app-view').hidden = false;
    let body;
    try {
      body = await api('/trials');
    } catch (e) {
      if (e instanceof AuthError) return;
      sessionStorage.removeItem(TOKEN_KEY);
      if (e.status === 403) showSignIn(`This token may not read trials (${errorText(e)}). Sign in with a monitor's token.`);
      else showSignIn(`Could not load the trials: ${errorText(e)}`);
      return;
    }
    state.trials = Array.isArray(body && body.items) ? body.items : [];
    const select = $('trial-select');
    select.replaceChildren(
      ...state.trials.map((t) => {
        const title = t.protocol && t.protocol.title ? ` — ${t.protocol.title}` : '';
        return h('option', { value: t.id, title: `${t.id}${title}` }, `${t.id}${title}`);
      }),
    );
    if (!state.trials.length) {
      showError('No trials are loaded on this server yet.');
      $('dashboard').hidden = true;
      $('subject-page').hidden = true;
      return;
    }
    await renderRoute();
  }

  function parseRoute() {
    const raw = location.hash.replace(/^#\/?/, '');
    const parts = raw.split('/').filter(Boolean).map((p) => {
      try {
        return decodeURIComponent(p);
      } catch (_) {
        return p;
      }
    });
    if (parts[0] === 'trial' && parts[1]) {
      if (parts[2] === 'subject' && parts[3]) return { view: 'subject', trial: parts[1], subject: parts[3] };
      return { view: 'dashboard', trial: parts[1] };
    }
    if (parts[0] === 'subject' && parts[1]) return { view: 'subject', trial: null, subject: parts[1] };
    return { view: 'dashboard', trial: null };
  }

  function findTrial(id) {
    return state.trials.find((t) => t.id === id) || null;
  }

  async function renderRoute() {
    if (!sessionStorage.getItem(TOKEN_KEY) || !state.trials.length) return;
    const route = parseRoute();
    let trial = route.trial || state.trial || sessionStorage.getItem(TRIAL_KEY);
    if (route.trial && !findTrial(route.trial)) {
      showError(`There is no trial "${route.trial}" on this server; showing ${state.trials[0].id}.`);
      trial = state.trials[0].id;
    } else if (!findTrial(trial)) {
      trial = state.trials[0].id;
    }
    selectTrial(trial);

    if (route.view === 'subject') {
      state.view = 'subject';
      clearTimeout(state.refreshTimer);
      $('dashboard').hidden = true;
      $('subject-page').hidden = false;
      window.scrollTo(0, 0);
      await loadSubject(trial, route.subject);
    } else {
      state.view = 'dashboard';
      $('subject-page').hidden = true;
      $('dashboard').hidden = false;
      if (state.dashboardTrial !== trial) {
        state.dashboardTrial = trial;
        resetDashboard();
        loadSites('');
        loadSubjects();
      }
      await loadDashboard();
    }
  }

  function selectTrial(id) {
    const trial = findTrial(id);
    state.trial = id;
    sessionStorage.setItem(TRIAL_KEY, id);
    $('trial-select').value = id;
    $('back-link').href = `#/trial/${encodeURIComponent(id)}`;
    // Site names and time zones, from the protocol; /sites adds to it.
    const info = new Map();
    const sites = trial && trial.protocol && Array.isArray(trial.protocol.sites) ? trial.protocol.sites : [];
    for (const site of sites) info.set(site.id, { name: site.name, timezone: site.timezone });
    for (const [k, v] of state.siteInfo) if (!info.has(k) && state.dashboardTrial === id) info.set(k, v);
    state.siteInfo = info;
  }

  function onTrialChange() {
    const id = $('trial-select').value;
    location.hash = `#/trial/${encodeURIComponent(id)}`;
  }

  // ---------------------------------------------------------------- banners

  function showError(message) {
    const b = $('error-banner');
    b.textContent = message;
    b.hidden = false;
  }

  function hideError() {
    $('error-banner').hidden = true;
    $('error-banner').textContent = '';
  }

  // ---------------------------------------------------------------- dashboard

  function resetDashboard() {
    state.dashboard = null;
    const dash = $('dashboard');
    dash.dataset.state = 'loading';
    dash.dataset.trial = state.trial;
    $('updated-at').textContent = '';
    hideError();
    for (const id of ['enrolment-chart', 'ae-chart', 'visit-calendar', 'dq-chart']) $(id).replaceChildren(h('p', { class: 'muted' }, 'Loading…'));
    for (const id of ['enrolment-table-head', 'enrolment-table-body', 'enrolment-table-foot', 'ae-late-body', 'visits-late-body', 'visits-by-visit-body', 'ingest-body', 'site-body', 'subject-body']) $(id).replaceChildren();
    $('site-search').value = '';
    $('subject-filter').value = '';
    renderSummaryTrial();
  }

  async function loadDashboard() {
    clearTimeout(state.refreshTimer);
    const trial = state.trial;
    const req = ++state.dashReq;
    const dash = $('dashboard');
    dash.setAttribute('aria-busy', 'true');
    try {
      const d = await api(`/trials/${encodeURIComponent(trial)}/dashboard`);
      if (req !== state.dashReq || trial !== state.trial) return;
      renderDashboard(d, trial);
      hideError();
      const now = new Date();
      state.lastUpdate = now.getTime();
      const updated = $('updated-at');
      updated.textContent = `updated ${fmtClock(now)}`;
      updated.title = d.generated_at ? `generated by the server at ${fmtInstant(d.generated_at)}; refreshes every 30 s` : 'refreshes every 30 s';
      updated.dataset.generatedAt = d.generated_at || '';
    } catch (e) {
      if (e instanceof AuthError || req !== state.dashReq) return;
      const since = state.lastUpdate && state.dashboard ? ` Showing the data from ${fmtClock(new Date(state.lastUpdate))}.` : '';
      if (e.status === 403) showError(`This token may not read the dashboard of ${trial} (${errorText(e)}).`);
      else showError(`Could not load the dashboard at ${fmtClock(new Date())}: ${errorText(e)}.${since}`);
      if (dash.dataset.state === 'loading') dash.dataset.state = 'error';
    } finally {
      if (req === state.dashReq) {
        dash.removeAttribute('aria-busy');
        if (state.view === 'dashboard' && !state.signingOut) state.refreshTimer = setTimeout(loadDashboard, REFRESH_MS);
      }
    }
  }

  function sectionOf(d, name) {
    const sec = d && d.sections ? d.sections[name] : undefined;
    if (!sec || typeof sec !== 'object') return { ok: false, reason: 'not in the server response', sec: null };
    if (sec.status !== 'ok') {
      const reason = sec.reason ? String(sec.reason) : `status ${sec.status === undefined ? 'missing' : JSON.stringify(sec.status)}`;
      return { ok: false, reason, sec };
    }
    return { ok: true, reason: '', sec };
  }

  function setSectionAvailability(name, ok, reason) {
    for (const card of document.querySelectorAll(`section.card[data-section="${name}"]`)) {
      card.classList.toggle('unavailable', !ok);
      card.dataset.status = ok ? 'ok' : 'unavailable';
      const r = card.querySelector('.section-reason');
      r.hidden = ok;
      r.textContent = ok ? '' : `Unavailable: ${reason}`;
      const body = card.querySelector('.section-body');
      if (body) body.hidden = !ok;
    }
  }

  function renderDashboard(d, trial) {
    state.dashboard = d;
    const secs = {};
    const unavailable = [];
    for (const [name] of SECTIONS) {
      secs[name] = sectionOf(d, name);
      setSectionAvailability(name, secs[name].ok, secs[name].reason);
      if (!secs[name].ok) unavailable.push([name, secs[name].reason]);
    }
    // Sections the page does not know about but the server marks unavailable.
    for (const [name, sec] of Object.entries((d && d.sections) || {})) {
      if (!SECTION_NAMES.has(name) && sec && sec.status !== 'ok') unavailable.push([name, sec.reason ? String(sec.reason) : 'unavailable']);
    }

    const banner = $('partial-banner');
    const list = $('partial-list');
    list.replaceChildren(
      ...unavailable.map(([name, reason]) =>
        h('li', { 'data-testid': 'partial-item', 'data-unavailable': name }, h('strong', null, SECTION_NAMES.get(name) || name), `: ${reason}`),
      ),
    );
    if (d.partial && !unavailable.length) list.append(h('li', { 'data-testid': 'partial-item' }, 'The server reported that some data is missing.'));
    banner.hidden = !(d.partial || unavailable.length);

    renderSummary(secs);
    if (secs.enrolment.ok) {
      renderEnrolmentChart(secs.enrolment.sec);
      renderEnrolmentTable(secs.enrolment.sec);
    }
    if (secs.adverse_events.ok) renderAdverseEvents(secs.adverse_events.sec);
    if (secs.visits.ok) renderVisits(secs.visits.sec);
    if (secs.data_quality.ok) renderDataQuality(secs.data_quality.sec);
    if (secs.ingest.ok) renderIngest(secs.ingest.sec);

    const dash = $('dashboard');
    dash.dataset.trial = d.trial || trial;
    dash.dataset.generatedAt = d.generated_at || '';
    dash.dataset.partial = String(Boolean(d.partial || unavailable.length));
    dash.dataset.seq = String(++state.dashSeq);
    dash.dataset.state = 'ready';
  }

  function renderSummaryTrial() {
    const trial = findTrial(state.trial);
    const p = (trial && trial.protocol) || {};
    $('summary-title').textContent = p.title || state.trial || '';
    $('summary-title').title = p.title || '';
    $('summary-trial-id').textContent = `${state.trial}${trial && trial.version ? ` v${trial.version}` : ''}`;
    $('summary-phase').textContent = PHASES[p.phase] || p.phase || 'phase not given';
    const period = p.period || {};
    $('summary-period').textContent = period.start || period.end ? `${period.start || '?'} to ${period.end || '?'}` : 'period not given';
    document.title = `${state.trial} · clinflow monitor`;
  }

  function renderSummary(secs) {
    renderSummaryTrial();
    const e = secs.enrolment;
    if (e.ok) {
      setText('summary-enrolled', fmtNum(e.sec.total), e.sec.total);
      const hasTarget = e.sec.target !== null && e.sec.target !== undefined;
      setText('summary-target', hasTarget ? fmtNum(e.sec.target) : 'no', hasTarget ? e.sec.target : null);
      $('summary-target-prefix').textContent = hasTarget ? 'of ' : '';
      $('summary-target-suffix').textContent = hasTarget ? ' target' : ' target set';
      const pct = hasTarget && num(e.sec.target) > 0 ? ` (${fmtNum((num(e.sec.total) / num(e.sec.target)) * 100)}%)` : '';
      setText('summary-enrolled-pct', pct);
    } else {
      setText('summary-enrolled', '—');
      setText('summary-target', '—');
      $('summary-target-prefix').textContent = 'of ';
      $('summary-target-suffix').textContent = ' target';
      setText('summary-enrolled-pct', ' (unavailable)');
    }
    const ae = secs.adverse_events;
    setText('summary-ae-total', ae.ok ? fmtNum(ae.sec.total) : '—', ae.ok ? ae.sec.total : null);
    const serious = ae.ok && ae.sec.by_seriousness ? ae.sec.by_seriousness.serious : null;
    setText('summary-ae-serious', ae.ok ? fmtNum(serious === undefined ? null : serious) : '—', serious);
    const dq = secs.data_quality;
    setText('summary-open-queries', dq.ok ? fmtNum(dq.sec.open_queries) : '—', dq.ok ? dq.sec.open_queries : null);
    setText('summary-rejected', dq.ok ? fmtNum(dq.sec.rejected_items_24h) : '—', dq.ok ? dq.sec.rejected_items_24h : null);
    const v = secs.visits;
    const overdue = v.ok && Array.isArray(v.sec.overdue) ? v.sec.overdue.length : null;
    const missed = v.ok && Array.isArray(v.sec.missed) ? v.sec.missed.length : null;
    setText('summary-overdue', fmtNum(overdue), overdue);
    setText('summary-missed', fmtNum(missed), missed);
  }

  // ---------------------------------------------------------------- charts: shared

  function niceStep(raw) {
    if (!(raw > 0)) return 1;
    const p = 10 ** Math.floor(Math.log10(raw));
    const f = raw / p;
    return (f <= 1 ? 1 : f <= 2 ? 2 : f <= 5 ? 5 : 10) * p;
  }

  /** Ticks from 0 to a round number at or above `max`; steps of whole units (these are counts). */
  function niceTicks(max, count = 5) {
    const top0 = max > 0 ? max : 1;
    const step = Math.max(1, niceStep(top0 / count));
    const top = Math.ceil(top0 / step) * step;
    const ticks = [];
    for (let v = 0; v <= top + step / 1000; v += step) ticks.push(Math.round(v * 1e6) / 1e6);
    return ticks;
  }

  function chartRoot(width, height, label, testid) {
    return s('svg', {
      viewBox: `0 0 ${width} ${height}`,
      class: 'chart-svg',
      role: 'img',
      'aria-label': label,
      'data-testid': testid,
      preserveAspectRatio: 'xMidYMid meet',
    });
  }

  function yAxis(root, ticks, y, left, right, label, top, bottom) {
    const g = s('g', { class: 'axis axis-y' });
    for (const t of ticks) {
      const yy = y(t);
      g.append(s('line', { class: 'grid', x1: left, x2: right, y1: yy, y2: yy }));
      g.append(s('text', { x: left - 6, y: yy, 'text-anchor': 'end', 'dominant-baseline': 'middle', class: 'tick' }, fmtNum(t)));
    }
    g.append(s('line', { class: 'axis-line', x1: left, x2: left, y1: top, y2: bottom }));
    const mid = (top + bottom) / 2;
    g.append(s('text', { class: 'axis-title', x: 14, y: mid, transform: `rotate(-90 14 ${mid})`, 'text-anchor': 'middle', 'data-testid': 'y-axis-label' }, label));
    root.append(g);
  }

  // ---------------------------------------------------------------- enrolment

  function renderEnrolmentChart(sec) {
    const box = $('enrolment-chart');
    const weekly = Array.isArray(sec.weekly) ? sec.weekly : [];
    if (!weekly.length) {
      box.replaceChildren(h('p', { class: 'muted empty', 'data-testid': 'enrolment-empty' }, 'No subjects enrolled yet.'));
      return;
    }
    const W = 640;
    const H = 250;
    const m = { top: 14, right: 18, bottom: 50, left: 56 };
    const iw = W - m.left - m.right;
    const ih = H - m.top - m.bottom;
    const n = weekly.length;
    const hasTarget = (w) => w.target !== null && w.target !== undefined && Number.isFinite(Number(w.target));
    const maxY = Math.max(1, ...weekly.map((w) => num(w.cumulative)), ...weekly.filter(hasTarget).map((w) => num(w.target)));
    const ticks = niceTicks(maxY, 5);
    const yMax = ticks[ticks.length - 1];
    const x = (i) => m.left + (n === 1 ? iw / 2 : (i * iw) / (n - 1));
    const y = (v) => m.top + ih - (num(v) / yMax) * ih;
    const last = weekly[n - 1];
    const root = chartRoot(
      W,
      H,
      `Cumulative enrolment by week: ${fmtNum(last.cumulative)} subjects by the week of ${last.week}` +
        (hasTarget(last) ? `, target ${fmtNum(last.target, 1)}` : ''),
      'enrolment-svg',
    );
    yAxis(root, ticks, y, m.left, W - m.right, 'subjects', m.top, m.top + ih);

    // x axis: at most ~8 week labels, the year under the first and wherever it changes.
    const gx = s('g', { class: 'axis axis-x' });
    gx.append(s('line', { class: 'axis-line', x1: m.left, x2: W - m.right, y1: m.top + ih, y2: m.top + ih }));
    const step = Math.max(1, Math.ceil(n / 8));
    let lastYear = null;
    for (let i = 0; i < n; i += step) {
      const d = parseDay(weekly[i].week);
      const xx = x(i);
      gx.append(s('line', { class: 'tick-mark', x1: xx, x2: xx, y1: m.top + ih, y2: m.top + ih + 4 }));
      const label = s('text', { x: xx, y: m.top + ih + 16, 'text-anchor': 'middle', class: 'tick', 'data-testid': 'enrolment-x-label', 'data-week': weekly[i].week }, shortDay(weekly[i].week));
      gx.append(label);
      const year = d ? d.getUTCFullYear() : null;
      if (year !== null && year !== lastYear) {
        gx.append(s('text', { x: xx, y: m.top + ih + 28, 'text-anchor': 'middle', class: 'tick tick-year' }, String(year)));
        lastYear = year;
      }
    }
    gx.append(s('text', { class: 'axis-title', x: m.left + iw / 2, y: H - 6, 'text-anchor': 'middle', 'data-testid': 'x-axis-label' }, 'week starting'));
    root.append(gx);

    // Target: dashed, broken wherever a week has no target.
    const segments = [];
    let cur = [];
    weekly.forEach((w, i) => {
      if (hasTarget(w)) cur.push(`${x(i).toFixed(1)},${y(w.target).toFixed(1)}`);
      else if (cur.length) {
        segments.push(cur);
        cur = [];
      }
    });
    if (cur.length) segments.push(cur);
    for (const seg of segments) {
      if (seg.length === 1) {
        const [px, py] = seg[0].split(',');
        root.append(s('line', { class: 'target-line', x1: +px - 4, x2: +px + 4, y1: py, y2: py, 'data-testid': 'enrolment-target-line' }));
      } else {
        root.append(s('polyline', { class: 'target-line', points: seg.join(' '), 'data-testid': 'enrolment-target-line' }));
      }
    }

    // Cumulative enrolment.
    root.append(
      s('polyline', {
        class: 'data-line',
        points: weekly.map((w, i) => `${x(i).toFixed(1)},${y(w.cumulative).toFixed(1)}`).join(' '),
        'data-testid': 'enrolment-line',
      }),
    );
    const r = n > 60 ? 2 : n > 30 ? 2.5 : 3.5;
    const points = s('g', { class: 'points' });
    weekly.forEach((w, i) => {
      const tip = `week of ${w.week}: ${fmtNum(w.enrolled)} enrolled, ${fmtNum(w.cumulative)} in total` + (hasTarget(w) ? `, target ${fmtNum(w.target, 1)}` : '');
      points.append(
        s(
          'circle',
          { class: 'data-point', cx: x(i).toFixed(1), cy: y(w.cumulative).toFixed(1), r, 'data-testid': 'enrolment-point', 'data-week': w.week, 'data-value': w.cumulative, 'data-target': hasTarget(w) ? w.target : null },
          s('title', null, tip),
        ),
      );
    });
    root.append(points);
    // The latest value, written next to the last point.
    root.append(
      s('text', { class: 'value-label', x: x(n - 1) - 6, y: y(last.cumulative) - 8, 'text-anchor': 'end', 'data-testid': 'enrolment-last-value' }, fmtNum(last.cumulative)),
    );
    box.replaceChildren(root);
  }

  function renderEnrolmentTable(sec) {
    const trial = findTrial(state.trial);
    const protocolArms = trial && trial.protocol && Array.isArray(trial.protocol.arms) ? trial.protocol.arms : [];
    const bySite = Array.isArray(sec.by_site) ? sec.by_site : [];
    const arms = [...protocolArms];
    const addArm = (a) => {
      if (!arms.includes(a)) arms.push(a);
    };
    Object.keys(sec.by_arm || {}).forEach(addArm);
    for (const site of bySite) Object.keys(site.by_arm || {}).forEach(addArm);

    $('enrolment-table-head').replaceChildren(h('tr', null, h('th', null, 'Site'), arms.map((a) => h('th', { class: 'num' }, a)), h('th', { class: 'num' }, 'Total')));
    $('enrolment-table-body').replaceChildren(
      ...bySite.map((site) =>
        h(
          'tr',
          { 'data-testid': 'enrolment-site-row', 'data-site': site.site },
          h('td', null, h('span', { class: 'site-name' }, site.name || siteName(site.site)), h('span', { class: 'muted id' }, site.site)),
          arms.map((a) => h('td', { class: 'num', 'data-arm': a }, fmtNum(site.by_arm ? site.by_arm[a] || 0 : null))),
          h('td', { class: 'num total', 'data-testid': 'enrolment-site-total', 'data-value': site.total }, fmtNum(site.total)),
        ),
      ),
    );
    if (!bySite.length) $('enrolment-table-body').append(h('tr', null, h('td', { colspan: arms.length + 2, class: 'muted' }, 'No subjects enrolled yet.')));
    $('enrolment-table-foot').replaceChildren(
      h(
        'tr',
        null,
        h('th', null, 'All sites'),
        arms.map((a) => h('td', { class: 'num', 'data-arm': a, 'data-testid': 'enrolment-arm-total' }, fmtNum(sec.by_arm ? sec.by_arm[a] || 0 : null))),
        h('td', { class: 'num total', 'data-testid': 'enrolment-table-total', 'data-value': sec.total }, fmtNum(sec.total)),
      ),
    );
  }

  // ---------------------------------------------------------------- adverse events

  function severityEntries(bySeverity) {
    const entries = Object.entries(bySeverity || {});
    const rank = (k) => {
      const i = SEVERITY_ORDER.indexOf(String(k).toLowerCase());
      return i < 0 ? SEVERITY_ORDER.length : i;
    };
    return entries.map((e, i) => [e, i]).sort((a, b) => rank(a[0][0]) - rank(b[0][0]) || a[1] - b[1]).map(([e]) => e);
  }

  function cssToken(text) {
    return String(text).toLowerCase().replace(/[^a-z0-9-]/g, '_');
  }

  function renderAdverseEvents(sec) {
    const box = $('ae-chart');
    const entries = severityEntries(sec.by_severity);
    if (!entries.length) {
      box.replaceChildren(h('p', { class: 'muted empty', 'data-testid': 'ae-empty' }, 'No adverse events reported.'));
    } else {
      const W = 560;
      const H = 220;
      const m = { top: 22, right: 12, bottom: 44, left: 54 };
      const iw = W - m.left - m.right;
      const ih = H - m.top - m.bottom;
      const ticks = niceTicks(Math.max(1, ...entries.map(([, v]) => num(v))), 5);
      const yMax = ticks[ticks.length - 1];
      const y = (v) => m.top + ih - (num(v) / yMax) * ih;
      const band = iw / entries.length;
      const bw = Math.min(72, band * 0.6);
      const root = chartRoot(W, H, `Adverse events by severity: ${entries.map(([k, v]) => `${k} ${fmtNum(v)}`).join(', ')}`, 'ae-svg');
      yAxis(root, ticks, y, m.left, W - m.right, 'events', m.top, m.top + ih);
      const bars = s('g', { class: 'bars' });
      entries.forEach(([k, v], i) => {
        const cx = m.left + band * i + band / 2;
        const top = y(v);
        bars.append(
          s(
            'g',
            { 'data-testid': 'ae-bar', 'data-severity': k, 'data-value': v },
            s('rect', { class: `bar sev-${cssToken(k)}`, x: (cx - bw / 2).toFixed(1), y: top.toFixed(1), width: bw.toFixed(1), height: Math.max(0, m.top + ih - top).toFixed(1) }, s('title', null, `${k}: ${fmtNum(v)} events`)),
            s('text', { class: 'value-label', x: cx, y: top - 5, 'text-anchor': 'middle', 'data-testid': 'ae-bar-value' }, fmtNum(v)),
            s('text', { class: 'tick bar-label', x: cx, y: m.top + ih + 16, 'text-anchor': 'middle', 'data-testid': 'ae-bar-label' }, k),
          ),
        );
      });
      root.append(bars);
      root.append(s('line', { class: 'axis-line', x1: m.left, x2: W - m.right, y1: m.top + ih, y2: m.top + ih }));
      root.append(s('text', { class: 'axis-title', x: m.left + iw / 2, y: H - 6, 'text-anchor': 'middle', 'data-testid': 'x-axis-label' }, 'severity'));
      box.replaceChildren(root);
    }

    const bs = sec.by_seriousness || {};
    setText('ae-serious', fmtNum(bs.serious), bs.serious);
    setText('ae-non-serious', fmtNum(bs['non-serious']), bs['non-serious']);

    const hours = sec.serious_report_hours;
    const limit = hours === null || hours === undefined ? 'the reporting limit' : `${fmtNum(hours, 1)} h`;
    $('ae-late-title').textContent = `Serious AEs reported later than ${limit}`;
    const late = Array.isArray(sec.serious_late) ? sec.serious_late : [];
    $('ae-late-body').replaceChildren(
      ...late.map((ae) =>
        h(
          'tr',
          { 'data-testid': 'ae-late-row', 'data-id': ae.id },
          h('td', { class: 'nowrap' }, subjectLink(ae.subject)),
          h('td', { class: 'nowrap', title: siteName(ae.site) }, ae.site),
          h('td', { class: 'nowrap' }, fmtInstantShort(ae.date)),
          h('td', { class: 'nowrap' }, fmtInstantShort(ae.recorded)),
          h('td', { class: 'num late' }, `${fmtNum(ae.hours, 1)} h`),
        ),
      ),
    );
    $('ae-late-table').hidden = !late.length;
    const empty = $('ae-late-empty');
    empty.hidden = late.length > 0;
    empty.textContent = `None: every serious AE was reported within ${limit}.`;
  }

  // ---------------------------------------------------------------- visits

  const dateFormats = new Map();
  function zoned(timezone, options) {
    const key = `${timezone}|${JSON.stringify(options)}`;
    let f = dateFormats.get(key);
    if (!f) {
      try {
        f = new Intl.DateTimeFormat('en-CA', { timeZone: timezone || 'UTC', ...options });
      } catch (_) {
        f = new Intl.DateTimeFormat('en-CA', { timeZone: 'UTC', ...options });
      }
      dateFormats.set(key, f);
    }
    return f;
  }

  /** The day a visit falls on (the appointment's day at the site, else the due date) and its local time. */
  function visitDay(item) {
    if (item.appointment) {
      const at = new Date(item.appointment);
      if (!Number.isNaN(at.getTime())) {
        const info = state.siteInfo.get(item.site);
        const tz = info && info.timezone;
        const day = zoned(tz, { year: 'numeric', month: '2-digit', day: '2-digit' }).format(at);
        const time = zoned(tz, { hour: '2-digit', minute: '2-digit', hourCycle: 'h23' }).format(at);
        return { day, time, tz: tz || 'UTC' };
      }
    }
    return { day: String(item.due || '').slice(0, 10), time: null, tz: null };
  }

  function visitTip(item, when) {
    const w = Array.isArray(item.window) ? item.window : [];
    const appt = when.time ? `appointment ${when.day} ${when.time} (${when.tz})` : 'no appointment yet';
    return `${item.subject} · ${item.visit} · ${siteName(item.site)} · due ${item.due || '?'} · window ${w[0] || '?'} to ${w[1] || '?'} · ${appt}`;
  }

  function renderVisits(sec) {
    const upcoming = Array.isArray(sec.upcoming) ? sec.upcoming : [];
    const overdue = Array.isArray(sec.overdue) ? sec.overdue : [];
    const missed = Array.isArray(sec.missed) ? sec.missed : [];
    setText('visits-upcoming-count', fmtNum(upcoming.length), upcoming.length);
    setText('visits-overdue-count', fmtNum(overdue.length), overdue.length);
    setText('visits-missed-count', fmtNum(missed.length), missed.length);

    const today = parseDay(sec.today) || parseDay(new Date().toISOString());
    const horizon = Number.isFinite(Number(sec.horizon_days)) && Number(sec.horizon_days) > 0 ? Math.min(Number(sec.horizon_days), 62) : 14;
    const end = addDays(today, horizon - 1);
    $('visits-range').textContent = `${dayKey(today)} to ${dayKey(end)}`;

    const byDay = new Map();
    const later = [];
    const todayKey = dayKey(today);
    const endKey = dayKey(end);
    for (const item of upcoming) {
      const when = visitDay(item);
      let key = when.day;
      if (!parseDay(key) || key < todayKey) key = todayKey; // due already, window still open
      if (key > endKey) {
        later.push(item);
        continue;
      }
      if (!byDay.has(key)) byDay.set(key, []);
      byDay.get(key).push({ item, when });
    }

    const cal = $('visit-calendar');
    const cells = [];
    for (const wd of WEEKDAYS) cells.push(h('div', { class: 'cal-head', role: 'columnheader' }, wd));
    const startOffset = (today.getUTCDay() + 6) % 7; // Monday = 0
    const gridStart = addDays(today, -startOffset);
    const endOffset = 6 - ((end.getUTCDay() + 6) % 7);
    const gridEnd = addDays(end, endOffset);
    for (let d = gridStart, first = true; d <= gridEnd; d = addDays(d, 1)) {
      const key = dayKey(d);
      const inRange = key >= todayKey && key <= endKey;
      const visits = (byDay.get(key) || []).sort((a, b) => String(a.when.time || '99').localeCompare(String(b.when.time || '99')));
      const cls = ['cal-day'];
      if (!inRange) cls.push('outside');
      if (key === todayKey) cls.push('today');
      if (d.getUTCDay() === 0 || d.getUTCDay() === 6) cls.push('weekend');
      const label = d.getUTCDate() === 1 || (first && inRange) ? `${d.getUTCDate()} ${MONTHS[d.getUTCMonth()]}` : String(d.getUTCDate());
      if (inRange) first = false;
      const MAX = visits.length <= 4 ? 4 : 3;
      const cell = h(
        'div',
        { class: cls.join(' '), role: 'gridcell', 'data-testid': inRange ? 'calendar-day' : 'calendar-day-outside', 'data-date': key, 'data-count': inRange ? visits.length : null, 'aria-label': `${key}: ${plural(visits.length, 'visit')}` },
        h('div', { class: 'cal-date' }, h('span', null, label), key === todayKey ? h('span', { class: 'cal-today' }, 'today') : null, visits.length ? h('span', { class: 'cal-count', 'data-testid': 'calendar-day-count' }, String(visits.length)) : null),
        visits.slice(0, MAX).map(({ item, when }) =>
          h('a', { class: 'cal-visit', href: subjectHref(item.subject), title: visitTip(item, when), 'data-testid': 'calendar-visit', 'data-subject': item.subject, 'data-visit': item.visit }, when.time ? h('span', { class: 'cal-time' }, when.time) : null, `${shortSubject(item.subject)} ${item.visit}`),
        ),
        visits.length > MAX ? h('span', { class: 'cal-more', title: visits.slice(MAX).map(({ item, when }) => visitTip(item, when)).join('\n') }, `+${visits.length - MAX} more`) : null,
      );
      cells.push(cell);
    }
    cal.replaceChildren(...cells);
    if (later.length) cal.append(h('p', { class: 'muted cal-later' }, `${plural(later.length, 'more visit')} due after ${endKey}.`));

    // Overdue and missed visits.
    const rows = [
      ...overdue.map((v) => ['overdue', v]),
      ...missed.map((v) => ['missed', v]),
    ].map(([status, v]) => {
      const w = Array.isArray(v.window) ? v.window : [];
      return h(
        'tr',
        { 'data-testid': 'visit-late-row', 'data-status': status, class: `status-${status}` },
        h('td', null, h('span', { class: `badge badge-${status}` }, status)),
        h('td', { class: 'nowrap' }, subjectLink(v.subject)),
        h('td', { class: 'nowrap', title: siteName(v.site) }, v.site),
        h('td', { class: 'nowrap' }, v.visit),
        h('td', { class: 'nowrap' }, v.due || '—'),
        h('td', { class: 'nowrap' }, w.length ? `${w[0]} to ${w[1]}` : '—'),
      );
    });
    $('visits-late-body').replaceChildren(...rows);
    $('visits-late-empty').hidden = rows.length > 0;

    // By visit, in protocol order.
    const trial = findTrial(state.trial);
    const protoVisits = trial && trial.protocol && Array.isArray(trial.protocol.visits) ? [...trial.protocol.visits].sort((a, b) => num(a.day) - num(b.day)).map((v) => v.id) : [];
    const byVisit = sec.by_visit || {};
    const names = Object.keys(byVisit).sort((a, b) => {
      const ia = protoVisits.indexOf(a);
      const ib = protoVisits.indexOf(b);
      return (ia < 0 ? 1e9 : ia) - (ib < 0 ? 1e9 : ib) || a.localeCompare(b);
    });
    $('visits-by-visit-body').replaceChildren(
      ...names.map((name) => {
        const c = byVisit[name] || {};
        return h(
          'tr',
          { 'data-testid': 'by-visit-row', 'data-visit': name },
          h('td', null, name),
          h('td', { class: 'num' }, fmtNum(c.completed)),
          h('td', { class: 'num' }, fmtNum(c.upcoming)),
          h('td', { class: `num${num(c.overdue) > 0 ? ' warn' : ''}` }, fmtNum(c.overdue)),
          h('td', { class: `num${num(c.missed) > 0 ? ' warn' : ''}` }, fmtNum(c.missed)),
        );
      }),
    );
  }

  // ---------------------------------------------------------------- data quality and ingest

  function renderDataQuality(sec) {
    setText('dq-rejected', fmtNum(sec.rejected_items_24h), sec.rejected_items_24h);
    const box = $('dq-chart');
    const rows = Array.isArray(sec.open_queries_by_site) ? sec.open_queries_by_site : [];
    if (!rows.length) {
      box.replaceChildren(h('p', { class: 'muted empty', 'data-testid': 'dq-empty' }, 'No open data queries.'));
      return;
    }
    const W = 560;
    const rowH = 28;
    const m = { top: 8, right: 40, bottom: 40, left: 230 };
    const ih = rows.length * rowH;
    const H = m.top + ih + m.bottom;
    const iw = W - m.left - m.right;
    const ticks = niceTicks(Math.max(1, ...rows.map((r) => num(r.open))), 4);
    const xMax = ticks[ticks.length - 1];
    const x = (v) => m.left + (num(v) / xMax) * iw;
    const root = chartRoot(W, H, `Open data queries by site: ${rows.map((r) => `${siteName(r.site)} ${fmtNum(r.open)}`).join(', ')}`, 'dq-svg');
    const g = s('g', { class: 'axis axis-x' });
    for (const t of ticks) {
      g.append(s('line', { class: 'grid', x1: x(t), x2: x(t), y1: m.top, y2: m.top + ih }));
      g.append(s('text', { class: 'tick', x: x(t), y: m.top + ih + 14, 'text-anchor': 'middle' }, fmtNum(t)));
    }
    g.append(s('line', { class: 'axis-line', x1: m.left, x2: m.left, y1: m.top, y2: m.top + ih }));
    g.append(s('line', { class: 'axis-line', x1: m.left, x2: W - m.right, y1: m.top + ih, y2: m.top + ih }));
    g.append(s('text', { class: 'axis-title', x: m.left + iw / 2, y: H - 6, 'text-anchor': 'middle', 'data-testid': 'x-axis-label' }, 'open queries'));
    root.append(g);
    rows.forEach((r, i) => {
      const yy = m.top + i * rowH;
      const name = siteName(r.site);
      const shown = name.length > 36 ? `${name.slice(0, 35)}…` : name;
      root.append(
        s(
          'g',
          { 'data-testid': 'dq-site', 'data-site': r.site, 'data-value': r.open },
          s('title', null, `${name} (${r.site}): ${fmtNum(r.open)} open queries`),
          s('text', { class: 'tick bar-label', x: m.left - 8, y: yy + rowH / 2, 'text-anchor': 'end', 'dominant-baseline': 'middle', 'data-testid': 'dq-site-label' }, shown),
          s('rect', { class: `bar dq-bar${num(r.open) > 0 ? '' : ' zero'}`, x: m.left, y: yy + 5, width: Math.max(0, x(r.open) - m.left).toFixed(1), height: rowH - 10 }),
          s('text', { class: 'value-label', x: x(r.open) + 5, y: yy + rowH / 2, 'dominant-baseline': 'middle', 'data-testid': 'dq-site-value' }, fmtNum(r.open)),
        ),
      );
    });
    box.replaceChildren(root);
  }

  function renderIngest(sec) {
    const stages = Array.isArray(sec.stages) ? sec.stages : [];
    $('ingest-body').replaceChildren(
      ...stages.map((st) =>
        h(
          'tr',
          { 'data-testid': 'ingest-row', 'data-stage': st.stage, class: num(st.queue_depth) > 0 ? 'queued' : null },
          h('td', null, st.stage),
          h('td', { class: `num${num(st.queue_depth) > 0 ? ' warn' : ''}`, 'data-testid': 'ingest-queue' }, fmtNum(st.queue_depth)),
          h('td', { class: 'num' }, `${fmtNum(st.busy)} / ${fmtNum(st.workers)}`),
          h('td', { class: 'num' }, fmtNum(st.items_total)),
          h('td', { class: 'num' }, fmtNum(st.items_per_second, 2)),
        ),
      ),
    );
    if (!stages.length) $('ingest-body').append(h('tr', null, h('td', { colspan: 5, class: 'muted' }, 'No ingest stages reported.')));
  }

  // ---------------------------------------------------------------- sites

  function onSiteSearch() {
    clearTimeout(state.siteDebounce);
    $('site-list').dataset.state = 'pending';
    state.siteDebounce = setTimeout(() => loadSites($('site-search').value.trim()), SEARCH_DEBOUNCE_MS);
  }

  function siteUrl(q, next) {
    if (typeof next === 'string' && next.startsWith('/') && !next.startsWith('//')) return next;
    const params = new URLSearchParams({ trial: state.trial });
    if (q) params.set('q', q);
    if (next !== null && next !== undefined) params.set('after', String(next)); // the last id of the previous page
    return `/sites?${params}`;
  }

  async function loadSites(q, more = false) {
    clearTimeout(state.siteDebounce);
    if (state.siteAbort) state.siteAbort.abort();
    const ctrl = new AbortController();
    state.siteAbort = ctrl;
    const req = ++state.siteReq;
    const list = $('site-list');
    list.dataset.state = 'loading';
    list.setAttribute('aria-busy', 'true');
    try {
      const body = await api(siteUrl(q, more ? state.siteNext : null), { signal: ctrl.signal });
      if (req !== state.siteReq) return;
      renderSites(body, q, more);
      list.dataset.query = q;
      list.dataset.state = 'ready';
    } catch (e) {
      if ((e && e.name === 'AbortError') || e instanceof AuthError || req !== state.siteReq) return;
      $('site-body').replaceChildren();
      const empty = $('site-empty');
      empty.hidden = false;
      empty.textContent = `Could not load the sites: ${errorText(e)}`;
      list.dataset.query = q;
      list.dataset.state = 'error';
    } finally {
      if (req === state.siteReq) list.removeAttribute('aria-busy');
    }
  }

  function renderSites(body, q, more) {
    const items = Array.isArray(body && body.items) ? body.items : [];
    for (const site of items) {
      const prev = state.siteInfo.get(site.id) || {};
      state.siteInfo.set(site.id, { name: site.name || prev.name, timezone: site.timezone || prev.timezone });
    }
    const rows = items.map((site) =>
      h(
        'tr',
        { 'data-testid': 'site-row', 'data-site': site.id, class: site.active === false ? 'inactive' : null },
        h('td', null, h('span', { class: 'site-name', 'data-testid': 'site-name' }, site.name || site.id), h('span', { class: 'muted id' }, site.id)),
        h('td', null, site.city || '—'),
        h('td', null, site.country || '—'),
        h('td', null, site.timezone || '—'),
        h('td', null, site.active === false ? 'inactive' : 'active'),
      ),
    );
    const tbody = $('site-body');
    if (more) tbody.append(...rows);
    else tbody.replaceChildren(...rows);
    const shown = tbody.querySelectorAll('[data-testid="site-row"]').length;
    const total = Number.isFinite(Number(body && body.total)) ? Number(body.total) : shown;
    const count = $('site-count');
    count.textContent = q ? `(${fmtNum(total)} matching "${q}")` : `(${fmtNum(total)})`;
    count.dataset.total = String(total);
    count.dataset.shown = String(shown);
    state.siteNext = body && body.next !== null && body.next !== undefined && body.next !== '' ? body.next : null;
    state.siteQuery = q;
    $('site-more').hidden = state.siteNext === null;
    const empty = $('site-empty');
    empty.hidden = shown > 0;
    empty.textContent = q ? `No site matches "${q}".` : 'No sites take part in this trial.';
  }

  // ---------------------------------------------------------------- subjects

  async function loadSubjects() {
    const req = ++state.subjectsReq;
    const trial = state.trial;
    const list = $('subject-list');
    list.dataset.state = 'loading';
    try {
      const body = await api(`/trials/${encodeURIComponent(trial)}/subjects`);
      if (req !== state.subjectsReq || trial !== state.trial) return;
      state.subjects = Array.isArray(body && body.items) ? body.items : [];
      const total = Number.isFinite(Number(body && body.total)) ? Number(body.total) : state.subjects.length;
      const count = $('subject-count');
      count.textContent = total > state.subjects.length ? `(${fmtNum(state.subjects.length)} of ${fmtNum(total)} shown)` : `(${fmtNum(total)})`;
      count.dataset.total = String(total);
      renderSubjects();
      list.dataset.state = 'ready';
    } catch (e) {
      if (e instanceof AuthError || req !== state.subjectsReq) return;
      $('subject-body').replaceChildren();
      const empty = $('subject-empty');
      empty.hidden = false;
      empty.textContent = e.status === 403 ? `This token may not list the subjects of ${trial}.` : `Could not load the subjects: ${errorText(e)}`;
      list.dataset.state = 'error';
    }
  }

  function renderSubjects() {
    const filter = $('subject-filter').value.trim().toLowerCase();
    const match = (sub) => !filter || [sub.subject, sub.site, siteName(sub.site), sub.arm, sub.status, sub.enrolled].some((v) => String(v || '').toLowerCase().includes(filter));
    const shown = state.subjects.filter(match);
    $('subject-body').replaceChildren(
      ...shown.map((sub) =>
        h(
          'tr',
          { 'data-testid': 'subject-row', 'data-subject': sub.subject },
          h('td', null, subjectLink(sub.subject, { 'data-testid': 'subject-link' })),
          h('td', { title: siteName(sub.site) }, sub.site || '—'),
          h('td', null, sub.arm || '—'),
          h('td', { class: 'nowrap' }, sub.enrolled || '—'),
          h('td', null, sub.status || '—'),
        ),
      ),
    );
    const empty = $('subject-empty');
    empty.hidden = shown.length > 0;
    empty.textContent = filter ? `No subject matches "${filter}".` : 'No subjects enrolled yet.';
  }

  // ---------------------------------------------------------------- subject page

  function clearSubjectPage(subject) {
    for (const id of ['subject-site', 'subject-arm', 'subject-enrolled', 'subject-patient', 'subject-value-count']) $(id).textContent = '';
    $('subject-title').textContent = subject;
    $('subject-trial').textContent = state.trial;
    $('subject-values-body').replaceChildren();
    $('subject-values-empty').hidden = true;
    $('subject-error').hidden = true;
  }

  async function loadSubject(trial, subject) {
    const req = ++state.subjectReq;
    const page = $('subject-page');
    page.dataset.state = 'loading';
    page.dataset.subject = subject;
    clearSubjectPage(subject);
    document.title = `${subject} · clinflow monitor`;
    try {
      const body = await api(`/trials/${encodeURIComponent(trial)}/subjects/${encodeURIComponent(subject)}`);
      if (req !== state.subjectReq) return;
      renderSubject(body, subject);
      page.dataset.state = 'ready';
    } catch (e) {
      if (e instanceof AuthError || req !== state.subjectReq) return;
      const err = $('subject-error');
      err.hidden = false;
      err.textContent =
        e.status === 404 ? `There is no subject ${subject} in ${trial}.` : e.status === 403 ? `This token may not read subject ${subject} (${errorText(e)}).` : `Could not load subject ${subject}: ${errorText(e)}`;
      page.dataset.state = 'error';
    }
  }

  function rangeFlag(v) {
    if (v.out_of_range !== true) return null;
    const soft = Array.isArray(v.soft) ? v.soft : null;
    const x = Number(v.value);
    if (soft && Number.isFinite(x) && x > Number(soft[1])) return ['▲ high', 'above the expected range'];
    if (soft && Number.isFinite(x) && x < Number(soft[0])) return ['▼ low', 'below the expected range'];
    return ['⚠ out of range', 'outside the expected range'];
  }

  function renderSubject(sub, subject) {
    $('subject-title').textContent = sub.subject || subject;
    $('subject-trial').textContent = state.trial;
    $('subject-site').textContent = sub.site ? `${siteName(sub.site)} (${sub.site})` : '—';
    $('subject-arm').textContent = sub.arm || '—';
    $('subject-enrolled').textContent = sub.enrolled || '—';
    $('subject-patient').textContent = sub.patient || '—';
    const values = Array.isArray(sub.values) ? sub.values : [];
    const oor = values.filter((v) => v.out_of_range === true).length;
    const count = $('subject-value-count');
    count.textContent = `(${plural(values.length, 'value')}, ${fmtNum(oor)} out of range)`;
    count.dataset.total = String(values.length);
    count.dataset.outOfRange = String(oor);
    $('subject-values-body').replaceChildren(
      ...values.map((v, i) => {
        const flag = rangeFlag(v);
        const soft = Array.isArray(v.soft) && v.soft.length === 2 ? `${fmtNum(v.soft[0], 4)} to ${fmtNum(v.soft[1], 4)}` : '—';
        return h(
          'tr',
          { 'data-testid': 'value-row', 'data-index': i, 'data-measurement': v.measurement, 'data-out-of-range': String(v.out_of_range === true), class: flag ? 'out-of-range' : null },
          h('td', { class: 'flag-cell' }, flag ? h('span', { class: 'flag', 'data-testid': 'value-flag', title: flag[1] }, flag[0]) : h('span', { class: 'visually-hidden' }, 'in range')),
          h('td', null, h('span', null, v.display || v.measurement), v.display && v.measurement ? h('span', { class: 'muted id' }, v.measurement) : null),
          h('td', { class: 'num value', 'data-testid': 'value-value', 'data-value': v.value }, typeof v.value === 'number' ? fmtNum(v.value, 4) : String(v.value === null || v.value === undefined ? '—' : v.value)),
          h('td', null, v.unit || ''),
          h('td', { class: 'nowrap' }, soft),
          h('td', { class: 'nowrap' }, fmtInstant(v.time)),
        );
      }),
    );
    $('subject-values-empty').hidden = values.length > 0;
    applyOutOfRangeFilter();
  }

  function applyOutOfRangeFilter() {
    const only = $('subject-only-oor').checked;
    for (const row of document.querySelectorAll('#subject-values-body tr')) row.hidden = only && !row.classList.contains('out-of-range');
  }

  // ---------------------------------------------------------------- wiring

  function boot() {
    $('signin-form').addEventListener('submit', onSignIn);
    $('signout-button').addEventListener('click', () => signOut('You have signed out.', false));
    $('refresh-button').addEventListener('click', () => {
      if (state.view === 'subject') renderRoute();
      else {
        loadDashboard();
        loadSites($('site-search').value.trim());
        loadSubjects();
      }
    });
    $('trial-select').addEventListener('change', onTrialChange);
    $('site-search').addEventListener('input', onSiteSearch);
    $('site-search').addEventListener('keydown', (ev) => {
      if (ev.key === 'Enter') {
        ev.preventDefault();
        loadSites($('site-search').value.trim());
      }
    });
    $('site-more').addEventListener('click', () => loadSites(state.siteQuery, true));
    $('subject-filter').addEventListener('input', renderSubjects);
    $('subject-only-oor').addEventListener('change', applyOutOfRangeFilter);
    window.addEventListener('hashchange', () => renderRoute());
    document.addEventListener('visibilitychange', () => {
      if (document.visibilityState === 'visible' && state.view === 'dashboard' && state.lastUpdate && Date.now() - state.lastUpdate > REFRESH_MS) loadDashboard();
    });

    const message = sessionStorage.getItem(MESSAGE_KEY);
    sessionStorage.removeItem(MESSAGE_KEY);
    if (sessionStorage.getItem(TOKEN_KEY)) start();
    else showSignIn(message);
  }

  boot();
})();
