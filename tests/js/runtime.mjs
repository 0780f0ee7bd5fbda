// Starts a real `sandboxd serve` for one test file and points the official E2B JS SDK at it the way
// E2B's docs configure it: through E2B_API_KEY, E2B_API_URL and E2B_SANDBOX_URL (one port serves the
// control-plane API and proxies envd traffic by the E2b-Sandbox-Id header).
//
// The tests use @e2b/code-interpreter's Sandbox as E2B's docs do: it asks for the template
// `code-interpreter-v1`, sandboxd's base plus the kernels, whose sandboxes also serve runCode
// (interpreter.test.mjs).
//
// Not a test file itself (node --test only picks up *.test.mjs).

import { spawn } from 'node:child_process'
import { closeSync, existsSync, mkdtempSync, openSync, readFileSync, rmSync } from 'node:fs'
import { createServer } from 'node:net'
import { tmpdir } from 'node:os'
import { dirname, join, resolve } from 'node:path'
import { fileURLToPath } from 'node:url'

const REPO = resolve(dirname(fileURLToPath(import.meta.url)), '..', '..')

/** Why the suite cannot run here, or false. `sandboxd serve` builds sandboxes from namespaces,
 * overlayfs and cgroups, so it needs root. */
export const skipReason =
  process.getuid && process.getuid() !== 0
    ? 'sandboxd serve needs root (namespaces, overlayfs, cgroups): run the JS SDK tests as root'
    : false

/** The Python that has sandboxd installed: $SANDBOXD_PYTHON, else the repo's .venv, else python3. */
export function python() {
  if (process.env.SANDBOXD_PYTHON) return process.env.SANDBOXD_PYTHON
  const venv = join(REPO, '.venv', 'bin', 'python')
  return existsSync(venv) ? venv : 'python3'
}

export function freePort() {
  return new Promise((resolvePort, reject) => {
    const server = createServer()
    server.unref()
    server.on('error', reject)
    server.listen(0, '127.0.0.1', () => {
      const { port } = server.address()
      server.close(() => resolvePort(port))
    })
  })
}

export const sleep = (ms) => new Promise((r) => setTimeout(r, ms))

/** Polls `check` until it returns a truthy value (returned) or `timeoutMs` passes (throws). */
export async function waitFor(check, { timeoutMs = 10_000, intervalMs = 50, what = 'condition' } = {}) {
  const deadline = Date.now() + timeoutMs
  for (;;) {
    const value = await check()
    if (value) return value
    if (Date.now() > deadline) throw new Error(`timed out after ${timeoutMs} ms waiting for ${what}`)
    await sleep(intervalMs)
  }
}

/**
 * Spawns `sandboxd serve` on a free loopback port with a temp data dir, waits for `GET /health` = 200
 * and sets the SDK's environment. Returns `{ url, apiKey, dataDir, log, stop }`; `stop()` kills every
 * sandbox through the API, then stops the runtime.
 */
/** Start `python ARGS` with its output in `log`, and wait until `url`/health answers 200 (or throw
 * with the log if it exits or takes longer than `timeoutMs`). `exited` is null while it runs. */
export async function startServer({ name, args, log, url, timeoutMs, env = process.env }) {
  const out = openSync(log, 'a')
  const child = spawn(python(), args, { stdio: ['ignore', out, out], env })
  closeSync(out)
  const server = { child, exited: null, readLog: () => (existsSync(log) ? readFileSync(log, 'utf8') : '') }
  server.exit = new Promise((r) =>
    child.on('exit', (code, signal) => {
      server.exited = { code, signal }
      r(server.exited)
    }),
  )
  child.on('error', (err) => {
    server.exited = { code: null, signal: null, error: err }
  })
  const deadline = Date.now() + timeoutMs
  for (;;) {
    if (server.exited) throw new Error(`${name} exited (${JSON.stringify(server.exited)}):\n${server.readLog()}`)
    try {
      const res = await fetch(`${url}/health`, { signal: AbortSignal.timeout(1000) })
      await res.arrayBuffer()
      if (res.status === 200) return server
    } catch {
      // not listening yet
    }
    if (Date.now() > deadline) {
      child.kill('SIGKILL')
      throw new Error(`${name} did not become healthy in ${timeoutMs / 1000} s:\n${server.readLog()}`)
    }
    await sleep(50)
  }
}

export async function startRuntime() {
  const port = await freePort()
  const url = `http://127.0.0.1:${port}`
  const apiKey = `js-test-key-${process.pid}`
  const dataDir = mkdtempSync(join(tmpdir(), 'sandboxd-js-'))
  const log = join(dataDir, 'serve.log')
  const server = await startServer({
    name: 'sandboxd serve',
    args: ['-m', 'sandboxd', 'serve', '--port', String(port), '--data-dir', dataDir, '--api-key', apiKey],
    log,
    url,
    timeoutMs: 60_000,
  })
  const { child, exit, readLog } = server

  // Exactly what a user following E2B's docs sets (the docs load them with dotenv).
  process.env.E2B_API_KEY = apiKey
  process.env.E2B_API_URL = url
  process.env.E2B_SANDBOX_URL = url
  process.env.E2B_VOLUME_API_URL = url
  delete process.env.E2B_DEBUG
  delete process.env.E2B_DOMAIN

  async function killAllSandboxes() {
    const headers = { 'X-API-KEY': apiKey }
    for (let round = 0; round < 10; round++) {
      const res = await fetch(`${url}/v2/sandboxes?limit=100`, { headers })
      const sandboxes = res.ok ? await res.json() : []
      if (sandboxes.length === 0) return
      for (const s of sandboxes) {
        const del = await fetch(`${url}/sandboxes/${s.sandboxID}`, { method: 'DELETE', headers })
        await del.arrayBuffer()
      }
    }
  }

  async function stop() {
    if (!server.exited) {
      try {
        await killAllSandboxes()
      } catch (err) {
        console.error(`could not kill the sandboxes: ${err}`)
      }
      child.kill('SIGTERM')
      const timer = setTimeout(() => {
        // A runtime killed outright leaves its warm sandboxes to the next runtime's sweep: say so,
        // with its log, so that a stop that hangs is seen, not only its leftovers.
        console.error(`sandboxd serve did not stop within 10 s of SIGTERM; SIGKILL. Its log:\n${readLog().slice(-4000)}`)
        child.kill('SIGKILL')
      }, 10_000)
      await exit
      clearTimeout(timer)
    }
    // Remove the data dir only when nothing is mounted under it any more (never delete through a
    // mount that a leaked sandbox might still hold).
    const mounts = readFileSync('/proc/self/mountinfo', 'utf8')
    if (!mounts.split('\n').some((line) => line.split(' ')[4]?.startsWith(dataDir))) {
      rmSync(dataDir, { recursive: true, force: true })
    } else {
      console.error(`left ${dataDir} in place: something is still mounted under it`)
    }
  }

  return { url, apiKey, dataDir, log, readLog, stop }
}

/** Kills `sandbox` when test `t` ends (E2B's examples leave that to the timeout; a test should not). */
export function killAfter(t, sandbox) {
  t.after(() => sandbox.kill().catch(() => {}))
  return sandbox
}

/** Runs the official `e2b` CLI (pinned in package.json) with `args` (stdin closed, as in CI) and returns
 * its output without colours; throws with the output if it fails. */
export function e2bCli(args, { cwd, timeoutMs = 60_000 } = {}) {
  const cli = join(REPO, 'tests', 'js', 'node_modules', '.bin', 'e2b')
  return new Promise((resolveOutput, reject) => {
    const child = spawn(cli, args, {
      cwd,
      env: { ...process.env, NO_COLOR: '1', FORCE_COLOR: '0', NO_UPDATE_NOTIFIER: '1' },
      stdio: ['ignore', 'pipe', 'pipe'],
      timeout: timeoutMs,
    })
    let output = ''
    child.stdout.on('data', (d) => (output += d))
    child.stderr.on('data', (d) => (output += d))
    child.on('error', reject)
    child.on('close', (code) => {
      const text = output.replace(/\u001b\[[0-9;]*m/g, '')
      if (code === 0) resolveOutput(text)
      else reject(new Error(`e2b ${args.join(' ')} exited with ${code}:\n${text}`))
    })
  })
}
