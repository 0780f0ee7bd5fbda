// Starts a real `sandboxd interpreter` (E2B's code-interpreter API on a free loopback port) whose
// kernels are the venv's (ipykernel, bash_kernel, Deno), and points the official JS SDK at it in
// debug mode: E2B_DEBUG=true makes `Sandbox.create()` local, and the SDK sends its runCode and
// context requests to E2B_SANDBOX_URL when it is set (to localhost:49999 otherwise).
//
// Not a test file itself (node --test only picks up *.test.mjs).

import { spawn } from 'node:child_process'
import { closeSync, existsSync, mkdirSync, mkdtempSync, openSync, readFileSync, rmSync, writeFileSync } from 'node:fs'
import { tmpdir } from 'node:os'
import { dirname, join } from 'node:path'

import { freePort, python, sleep } from './runtime.mjs'

/** Kernelspecs for the venv's kernels, as a code-interpreter template installs its own. */
function writeKernelspecs(dir) {
  const py = python()
  const specs = {
    python3: ['python', [py, '-m', 'ipykernel_launcher', '-f', '{connection_file}']],
    bash: ['bash', [py, '-m', 'bash_kernel', '-f', '{connection_file}']],
    deno: ['typescript', [join(dirname(py), 'deno'), 'jupyter', '--kernel', '--conn', '{connection_file}']],
  }
  for (const [name, [language, argv]] of Object.entries(specs)) {
    mkdirSync(join(dir, name), { recursive: true })
    writeFileSync(join(dir, name, 'kernel.json'), JSON.stringify({ argv, display_name: name, language }))
  }
}

/**
 * Spawns the interpreter, waits for `GET /health` = 200 (its Python kernel is warm then) and points
 * the SDK at it. Returns `{ url, cwd, readLog, stop }`.
 */
export async function startInterpreter() {
  const port = await freePort()
  const url = `http://127.0.0.1:${port}`
  const base = mkdtempSync(join(tmpdir(), 'sandboxd-js-interp-'))
  const kernels = join(base, 'kernels')
  const cwd = join(base, 'home')
  const home = join(base, 'root')
  for (const dir of [kernels, cwd, home]) mkdirSync(dir, { recursive: true })
  writeKernelspecs(kernels)
  const log = join(base, 'interpreter.log')
  const out = openSync(log, 'a')
  const child = spawn(
    python(),
    ['-m', 'sandboxd', 'interpreter', '--port', String(port), '--cwd', cwd, '--kernel-dir', kernels, '--envd-url', ''],
    { stdio: ['ignore', out, out], env: { ...process.env, HOME: home } },
  )
  closeSync(out)
  let exited = null
  const exit = new Promise((r) =>
    child.on('exit', (code, signal) => {
      exited = { code, signal }
      r(exited)
    }),
  )
  const readLog = () => (existsSync(log) ? readFileSync(log, 'utf8') : '')
  const deadline = Date.now() + 120_000
  for (;;) {
    if (exited) throw new Error(`sandboxd interpreter exited (${JSON.stringify(exited)}):\n${readLog()}`)
    try {
      const res = await fetch(`${url}/health`, { signal: AbortSignal.timeout(1000) })
      await res.arrayBuffer()
      if (res.status === 200) break
    } catch {
      // not listening yet
    }
    if (Date.now() > deadline) {
      child.kill('SIGKILL')
      throw new Error(`sandboxd interpreter did not become healthy in 120 s:\n${readLog()}`)
    }
    await sleep(50)
  }

  process.env.E2B_DEBUG = 'true'
  process.env.E2B_SANDBOX_URL = url
  delete process.env.E2B_API_URL

  async function stop() {
    if (!exited) {
      child.kill('SIGTERM')
      const timer = setTimeout(() => child.kill('SIGKILL'), 15_000)
      await exit
      clearTimeout(timer)
    }
    rmSync(base, { recursive: true, force: true })
  }

  return { url, cwd, readLog, stop }
}
