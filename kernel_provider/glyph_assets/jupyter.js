// The Jupyter glyph: one code cell on a glyph's own kernel, with everything a notebook shows.
//
// QNTX imports this module and calls render(glyph, ui) with its GlyphUI (see README, "The
// Jupyter glyph"). Runs go over ui.pluginWebSocket() as the provider's live-run protocol
// (kernel_provider/live.py); interrupt, restart and the kernel's state over ui.pluginFetch().
// Output never runs script in QNTX's page: HTML goes into a sandboxed iframe without
// allow-scripts, Markdown through DOMPurify, text through ansi_up (which escapes HTML).

import { AnsiUp } from './ansi_up.js';
import { marked } from './marked.esm.js';
import DOMPurify from './purify.es.mjs';

export const glyphDef = { symbol: '⌬', title: 'Jupyter', label: 'jupyter', defaultWidth: 640, defaultHeight: 480 };

// The mime type a notebook shows of a bundle, first match wins (Jupyter's order, except that
// LaTeX, which we can only show as text, yields to a picture of the same value).
export const MIME_ORDER = [
  'text/html', 'text/markdown', 'image/svg+xml', 'image/png', 'image/jpeg', 'image/gif',
  'text/latex', 'application/json', 'text/plain',
];

const DATA = 1; // WebSocketMessage.Type.DATA: the only frames QNTX passes to the browser
const STATE_POLL_MS = 5000;

export async function render(glyph, ui) {
  const glyphId = String(glyph.id);
  const ansi = new AnsiUp();
  const root = element('div', 'kp-jupyter');
  root.dataset.kpGlyph = glyphId;

  // --- layout: toolbar, code cell, outputs, packages, status ------------------------------
  const runButton = button('Run', 'Run (Shift+Enter)', () => run());
  runButton.classList.add('kp-primary');
  const interruptButton = button('Interrupt', 'Interrupt the running code', () => interrupt());
  const restartButton = button('Restart', 'Give this glyph a fresh kernel (its variables are lost)', () => restart());
  const notebookButton = button('Notebook', 'Download this glyph\'s runs as a Jupyter notebook', () => downloadNotebook());
  const packagesButton = button('Packages', 'Install packages into this glyph\'s environment', () => togglePackages());
  const stateBadge = element('span', 'kp-state');
  const kernelspecLabel = element('span', 'kp-kernelspec');
  const upstreamLabel = element('span', 'kp-upstream');
  const toolbar = element('div', 'kp-toolbar');
  toolbar.append(runButton, interruptButton, restartButton, notebookButton, packagesButton, stateBadge, kernelspecLabel, upstreamLabel);

  const prompt = element('span', 'kp-prompt');
  const code = element('textarea', 'kp-code');
  code.spellcheck = false;
  code.placeholder = 'Python code; Shift+Enter runs it';
  const cell = element('div', 'kp-cell');
  cell.append(prompt, code);

  const outputs = element('div', 'kp-outputs');
  const packagesPanel = packagesUI();
  const status = ui.statusLine ? ui.statusLine() : fallbackStatusLine();
  root.append(toolbar, cell, packagesPanel.element, outputs, status.element);
  if (ui.preventDrag) ui.preventDrag(code, outputs, packagesPanel.element);

  // --- state ---------------------------------------------------------------------------------
  let upstream = null; // what the last glyph melded onto this one passed, as the run's upstream
  let running = null; // {id, displays: Map(display_id -> [view]), clearPending} while a run is live
  let nextId = 1;
  let socket = null;
  let socketOpen = null;
  const actions = new Map(); // request id -> handler of its answers, for requests that are not runs

  function showState(state, executionCount, kernelName) {
    stateBadge.textContent = state;
    stateBadge.dataset.state = state;
    if (executionCount !== undefined) prompt.textContent = `[${executionCount ?? ' '}]:`;
    if (kernelName) kernelspecLabel.textContent = kernelName;
    runButton.disabled = running !== null;
  }

  async function refreshState() {
    try {
      const [kernels, specs] = await Promise.all([fetchJSON('/kernels'), kernelspecLabel.textContent ? null : fetchJSON('/kernelspecs')]);
      if (specs && !kernelspecLabel.textContent) kernelspecLabel.textContent = specs.default;
      if (running) return; // the run's own events are fresher than a poll
      const mine = kernels.kernels.find((k) => k.glyph_id === glyphId);
      if (!mine) showState('no kernel', null);
      else showState(mine.execution_state === 'stopped' ? 'dead' : mine.execution_state, mine.execution_count || null, mine.kernel_name);
    } catch (error) {
      ui.log?.warn?.('kernel state unavailable', error);
    }
  }

  async function fetchJSON(path, options) {
    const response = await ui.pluginFetch(path, options);
    const body = await response.json().catch(() => ({}));
    if (!response.ok) throw new Error(body.error || `${path} answered ${response.status}`);
    return body;
  }

  // --- the code: kept with the glyph's config ---------------------------------------------
  let saveTimer = null;
  function saveCode() {
    clearTimeout(saveTimer);
    saveTimer = null;
    return Promise.resolve(ui.saveConfig({ code: code.value })).catch((error) => ui.log?.warn?.('saveConfig failed', error));
  }
  function fitCode() {
    code.style.height = 'auto';
    code.style.height = `${Math.min(code.scrollHeight + 2, 400)}px`;
  }
  code.addEventListener('input', () => {
    fitCode();
    clearTimeout(saveTimer);
    saveTimer = setTimeout(saveCode, 500);
  });
  code.addEventListener('keydown', (event) => {
    if (event.key === 'Enter' && event.shiftKey) {
      event.preventDefault();
      run();
    } else if (event.key === 'Tab' && !event.shiftKey) {
      event.preventDefault();
      code.setRangeText('    ', code.selectionStart, code.selectionEnd, 'end');
    }
  });
  const saved = await Promise.resolve(ui.loadConfig()).catch(() => null);
  if (saved && typeof saved.code === 'string') code.value = saved.code;
  requestAnimationFrame(fitCode);

  if (ui.onMeld) {
    const unsubscribe = ui.onMeld(({ glyphId: from, symbol, direction, content }) => {
      upstream = { glyph_id: from, symbol, direction, content };
      upstreamLabel.textContent = `upstream: ${symbol || ''} ${from}`;
    });
    if (typeof unsubscribe === 'function') ui.onCleanup?.(unsubscribe);
  }

  // --- the websocket ---------------------------------------------------------------------------
  function connect() {
    if (socket && socket.readyState <= WebSocket.OPEN) return socketOpen;
    socket = ui.pluginWebSocket();
    socketOpen = new Promise((resolve, reject) => {
      socket.addEventListener('open', resolve, { once: true });
      socket.addEventListener('error', () => reject(new Error('the live-run connection failed')), { once: true });
    });
    socket.addEventListener('message', (event) => {
      const message = decodeFrame(event.data);
      if (message) onMessage(message);
    });
    socket.addEventListener('close', () => {
      socket = null;
      if (running) finishRun(null, 'the live-run connection closed before the run ended');
      for (const handler of [...actions.values()]) handler({ type: 'error', error: 'the connection closed before the answer came' });
    });
    return socketOpen;
  }

  function send(request) {
    socket.send(JSON.stringify({ type: DATA, data: base64(JSON.stringify(request)), timestamp: Date.now() * 1e6 }));
  }

  function onMessage(message) {
    const action = message.id !== undefined && actions.get(message.id);
    if (action) return action(message);
    if (!running || (message.id !== undefined && message.id !== running.id)) return;
    switch (message.type) {
      case 'output': return addOutput(message.output, message.display_id);
      case 'clear_output':
        if (message.wait) running.clearPending = true;
        else clearOutputs();
        return;
      case 'update_display_data': return updateDisplay(message.display_id, message.output);
      case 'result': return finishRun(message.result, null);
      case 'error': return finishRun(null, message.error);
    }
  }

  // --- running -------------------------------------------------------------------------------
  async function run() {
    if (running) {
      status.show('this glyph is still running; interrupt it or wait.', true);
      return;
    }
    const source = code.value;
    running = { id: `${glyphId}:${nextId++}`, displays: new Map(), clearPending: false };
    outputs.replaceChildren();
    status.clear();
    showState('busy', '*');
    saveCode();
    try {
      await connect();
      const request = { id: running.id, glyph_id: glyphId, code: source };
      if (upstream) request.upstream = upstream;
      send(request);
    } catch (error) {
      finishRun(null, error.message);
    }
  }

  function finishRun(result, problem) {
    running = null;
    if (problem) status.show(problem, true);
    if (result) {
      const kernelDied = typeof result.error === 'string' && /Kernel ?Died|kernel died/i.test(result.error);
      showState(kernelDied ? 'dead' : 'idle', result.execution_count ?? null);
      // An error the kernel did not send as an output (a timeout, a dead kernel) is shown too.
      if (result.error && !outputs.querySelector('.kp-error')) addOutput({ output_type: 'error', traceback: [result.error] });
    }
    refreshState();
  }

  async function interrupt() {
    try {
      await fetchJSON(`/kernels/${encodeURIComponent(glyphId)}/interrupt`, { method: 'POST' });
      status.show('interrupted');
    } catch (error) {
      status.show(error.message, true);
    }
  }

  async function restart() {
    showState('starting');
    try {
      const info = await fetchJSON(`/kernels/${encodeURIComponent(glyphId)}/restart`, { method: 'POST' });
      outputs.replaceChildren();
      status.show('restarted: a fresh kernel');
      showState(info.execution_state, null, info.kernel_name);
    } catch (error) {
      status.show(error.message, true);
      refreshState();
    }
  }

  async function downloadNotebook() {
    try {
      const notebook = await fetchJSON(`/kernels/${encodeURIComponent(glyphId)}/notebook`);
      const link = element('a');
      link.href = URL.createObjectURL(new Blob([JSON.stringify(notebook, null, 1)], { type: 'application/x-ipynb+json' }));
      link.download = `${glyphId.replace(/[^\w.-]+/g, '_')}.ipynb`;
      link.click();
      setTimeout(() => URL.revokeObjectURL(link.href), 10_000);
    } catch (error) {
      status.show(error.message, true);
    }
  }

  // --- outputs -------------------------------------------------------------------------------
  function clearOutputs() {
    outputs.replaceChildren();
    running.displays.clear();
    running.clearPending = false;
  }

  function addOutput(output, displayId) {
    if (running?.clearPending) clearOutputs();
    const last = outputs.lastElementChild;
    if (output.output_type === 'stream' && last?.kpOutput?.output_type === 'stream' && last.kpOutput.name === output.name) {
      last.kpOutput.text += output.text; // consecutive chunks of one stream are one block, as in a notebook
      last.replaceWith(view(last.kpOutput));
      return;
    }
    const shown = view(output);
    outputs.append(shown);
    const id = displayId ?? output.transient?.display_id;
    if (id && running) running.displays.set(id, [...(running.displays.get(id) || []), shown]);
  }

  function updateDisplay(displayId, output) {
    const views = running.displays.get(displayId) || [];
    running.displays.set(displayId, views.map((old) => {
      const fresh = view({ ...old.kpOutput, data: output.data, metadata: output.metadata || {} });
      old.replaceWith(fresh);
      return fresh;
    }));
  }

  function view(output) {
    const box = element('div', `kp-output kp-${output.output_type}`);
    box.kpOutput = output;
    if (output.output_type === 'stream') {
      box.classList.add(`kp-${output.name}`);
      box.append(ansiBlock(output.text));
    } else if (output.output_type === 'error') {
      box.classList.add('kp-error');
      const text = (output.traceback && output.traceback.length)
        ? output.traceback.join('\n') : `${output.ename}: ${output.evalue}`;
      box.append(ansiBlock(text));
    } else {
      if (output.output_type === 'execute_result') {
        box.append(Object.assign(element('span', 'kp-out-prompt'), { textContent: `Out[${output.execution_count ?? ' '}]:` }));
      }
      box.append(mimeView(output.data || {}, output.metadata || {}));
    }
    return box;
  }

  function mimeView(data, metadata) {
    const mime = MIME_ORDER.find((type) => type in data);
    const value = data[mime];
    const text = Array.isArray(value) ? value.join('') : value;
    const holder = element('div', 'kp-mime');
    holder.dataset.mime = mime || 'none';
    if (mime === 'text/html') holder.append(sandboxedFrame(text));
    else if (mime === 'text/markdown') holder.innerHTML = DOMPurify.sanitize(marked.parse(text));
    else if (mime === 'image/svg+xml') holder.append(image(`data:image/svg+xml;charset=utf-8,${encodeURIComponent(text)}`, metadata[mime]));
    else if (mime?.startsWith('image/')) holder.append(image(`data:${mime};base64,${text.replace(/\s/g, '')}`, metadata[mime]));
    else if (mime === 'application/json') holder.append(textBlock(JSON.stringify(value, null, 2)));
    else if (mime) holder.append(mime === 'text/plain' ? ansiBlock(text) : textBlock(text));
    else holder.append(textBlock(`(no data this glyph can show: ${Object.keys(data).join(', ') || 'empty'})`));
    return holder;
  }

  // HTML output in an iframe whose sandbox has no allow-scripts: its script and event
  // handlers never run. allow-same-origin only lets us read its height to size it.
  function sandboxedFrame(html) {
    const frame = element('iframe', 'kp-html');
    frame.setAttribute('sandbox', 'allow-same-origin');
    frame.setAttribute('referrerpolicy', 'no-referrer');
    frame.srcdoc = `<!doctype html><meta charset="utf-8"><style>body{margin:0;font:13px sans-serif}table{border-collapse:collapse}td,th{border:1px solid #ccc;padding:2px 6px}</style>${html}`;
    frame.addEventListener('load', () => {
      const height = frame.contentDocument?.body?.scrollHeight;
      if (height) frame.style.height = `${Math.min(height + 4, 600)}px`;
    });
    return frame;
  }

  function image(src, meta) {
    const img = element('img', 'kp-image');
    img.src = src;
    if (meta?.width) img.width = meta.width;
    if (meta?.height) img.height = meta.height;
    return img;
  }

  function ansiBlock(text) {
    const pre = element('pre', 'kp-text');
    pre.innerHTML = ansi.ansi_to_html(text); // escapes &, < and >, then adds colour spans
    return pre;
  }

  function textBlock(text) {
    return Object.assign(element('pre', 'kp-text'), { textContent: text });
  }

  // --- packages --------------------------------------------------------------------------------
  // Installs go over the websocket ({"action": "install"}) so the installer's output shows as it comes.
  function packagesUI() {
    const panel = element('div', 'kp-packages');
    panel.hidden = true;
    const input = element('input', 'kp-package-names');
    input.placeholder = 'packages to install, e.g. requests==2.32.3 tqdm';
    const install = button('Install', 'Install into this glyph\'s environment', () => installPackages());
    const log = element('pre', 'kp-package-log');
    const list = element('pre', 'kp-package-list');
    panel.append(input, install, log, list);
    input.addEventListener('keydown', (event) => { if (event.key === 'Enter') installPackages(); });

    async function installPackages() {
      const packages = input.value.split(/[\s,]+/).filter(Boolean);
      if (!packages.length) return;
      install.disabled = true;
      log.textContent = `installing ${packages.join(' ')} …\n`;
      const id = `${glyphId}:install:${nextId++}`;
      actions.set(id, (message) => {
        if (message.type === 'install_output') {
          log.textContent += `${message.line}\n`;
          log.scrollTop = log.scrollHeight;
          return;
        }
        actions.delete(id);
        install.disabled = false;
        if (message.type === 'install_result') {
          const installed = message.result.installed.map((p) => `${p.name} ${p.version}`).join(', ');
          log.textContent += `installed: ${installed || 'nothing new'}\n`;
          refreshList();
        } else {
          log.textContent += `${message.error}\n`;
        }
      });
      try {
        await connect();
        send({ id, action: 'install', packages, glyph_id: glyphId });
      } catch (error) {
        actions.delete(id);
        install.disabled = false;
        log.textContent += `${error.message}\n`;
      }
    }

    async function refreshList() {
      try {
        const { environments } = await fetchJSON('/packages');
        const mine = environments.find((e) => e.kernelspec === kernelspecLabel.textContent) || environments[0];
        install.disabled = !mine.installable;
        list.textContent = mine.installable
          ? mine.packages.map((p) => `${p.name} ${p.version}`).join('\n')
          : `cannot install here: ${mine.not_installable_because}`;
      } catch (error) {
        list.textContent = error.message;
      }
    }

    return { element: panel, show() { panel.hidden = false; refreshList(); } };
  }

  function togglePackages() {
    if (packagesPanel.element.hidden) packagesPanel.show();
    else packagesPanel.element.hidden = true;
  }

  // --- small helpers -----------------------------------------------------------------------------
  function button(label, title, onClick) {
    const made = element('button', 'kp-button');
    made.type = 'button';
    made.textContent = label;
    made.title = title;
    made.addEventListener('click', onClick);
    return made;
  }

  function fallbackStatusLine() {
    const line = element('div', 'kp-status');
    return {
      element: line,
      show(message, isError) { line.textContent = message; line.classList.toggle('kp-status-error', Boolean(isError)); },
      clear() { line.textContent = ''; },
    };
  }

  showState('…', null);
  await refreshState();
  const poll = setInterval(refreshState, STATE_POLL_MS);
  ui.onCleanup?.(() => {
    clearInterval(poll);
    if (saveTimer) saveCode();
    socket?.close();
  });
  return root;
}

function element(tag, className) {
  const made = document.createElement(tag);
  if (className) made.className = className;
  return made;
}

// A QNTX browser frame is JSON {type, data: base64 of the plugin's bytes}; our bytes are JSON.
function decodeFrame(raw) {
  try {
    const frame = JSON.parse(raw);
    if (frame.type !== DATA && frame.type !== 'DATA') return null;
    const bytes = Uint8Array.from(atob(frame.data || ''), (c) => c.charCodeAt(0));
    return JSON.parse(new TextDecoder().decode(bytes));
  } catch {
    return null;
  }
}

function base64(text) {
  const bytes = new TextEncoder().encode(text);
  let binary = '';
  for (let i = 0; i < bytes.length; i += 0x8000) binary += String.fromCharCode(...bytes.subarray(i, i + 0x8000));
  return btoa(binary);
}
