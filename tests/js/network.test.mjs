// E2B docs, "Internet access" and "Network egress" (docs/sandbox/internet-access): allowInternetAccess,
// network.allowOut / denyOut with ALL_TRAFFIC, updateNetwork, header rules and allowPublicTraffic, with
// the official `e2b` JS SDK against a real `sandboxd serve` whose egress goes to a small internet of the
// test's own (tests/netlab.py builds it in network namespaces and starts the runtime in it).

import assert from 'node:assert/strict'
import { spawn } from 'node:child_process'
import { existsSync, readFileSync } from 'node:fs'
import { dirname, join, resolve } from 'node:path'
import { createInterface } from 'node:readline'
import { after, before, describe, test } from 'node:test'
import { fileURLToPath } from 'node:url'

import { ALL_TRAFFIC, Sandbox } from 'e2b'

import { killAfter, skipReason } from './runtime.mjs'

const REPO = resolve(dirname(fileURLToPath(import.meta.url)), '..', '..')
const PROBE = readFileSync(join(REPO, 'tests', 'sandbox_probe.py'), 'utf8')

function python() {
  if (process.env.SANDBOXD_PYTHON) return process.env.SANDBOXD_PYTHON
  const venv = join(REPO, '.venv', 'bin', 'python')
  return existsSync(venv) ? venv : 'python3'
}

/** Starts tests/netlab.py's lab and runtime; resolves with what it printed (URLs, addresses). */
function startLab() {
  const child = spawn(python(), [join(REPO, 'tests', 'netlab.py'), 'up', '--domain', 'lab.test'], {
    stdio: ['pipe', 'pipe', 'inherit'],
  })
  return new Promise((resolveLab, reject) => {
    const lines = createInterface({ input: child.stdout })
    lines.once('line', (line) => resolveLab({ child, ...JSON.parse(line) }))
    child.once('exit', (code) => reject(new Error(`netlab exited with ${code} before it was up`)))
  })
}

async function probe(sandbox, ...checks) {
  const result = await sandbox.commands.run(`python3 /tmp/probe.py '${JSON.stringify(checks)}'`, { timeoutMs: 60_000 })
  return JSON.parse(result.stdout)
}

const web = (name, more = {}) => ({ kind: 'http', name, port: more.tls ? 443 : 80, tls: false, ...more })
const oks = (answers) => answers.map((a) => a.ok)

async function create(t, opts = {}) {
  const sandbox = killAfter(t, await Sandbox.create({ timeoutMs: 120_000, ...opts }))
  await sandbox.files.write('/tmp/probe.py', PROBE)
  return sandbox
}

describe('sandbox networking (docs/sandbox/internet-access)', { skip: skipReason }, () => {
  let lab
  before(async () => {
    lab = await startLab()
    process.env.E2B_API_KEY = lab.E2B_API_KEY
    process.env.E2B_API_URL = lab.E2B_API_URL
    process.env.E2B_SANDBOX_URL = lab.E2B_SANDBOX_URL
    delete process.env.E2B_DEBUG
  })
  after(async () => {
    if (!lab) return
    const exited = new Promise((r) => lab.child.once('exit', r))
    lab.child.stdin.end()
    await exited
  })

  test('internet access by default, by address and by name', async (t) => {
    const sandbox = await create(t)
    const answers = await probe(sandbox, web(lab.web, { ip: lab.web }), web('allowed.test'), web(lab.web6, { ip: lab.web6 }))
    assert.deepEqual(oks(answers), [true, true, true], JSON.stringify(answers))
  })

  test('Sandbox.create({ allowInternetAccess: false }) reaches nothing', async (t) => {
    const sandbox = await create(t, { allowInternetAccess: false })
    const answers = await probe(sandbox, web(lab.web, { ip: lab.web }), web('allowed.test'), web(lab.web6, { ip: lab.web6 }))
    assert.deepEqual(oks(answers), [false, false, false])
    assert.equal((await sandbox.getInfo()).allowInternetAccess, false)
  })

  test('network: { allowOut: [host], denyOut: [ALL_TRAFFIC] } allows that name only', async (t) => {
    const sandbox = await create(t, { network: { allowOut: ['allowed.test'], denyOut: [ALL_TRAFFIC] } })
    await sandbox.files.write('/tmp/lab-ca.pem', readFileSync(lab.caFile, 'utf8'))
    const answers = await probe(
      sandbox,
      web('allowed.test', { tls: true, ca: '/tmp/lab-ca.pem' }),
      web('denied.test', { tls: true, ca: '/tmp/lab-ca.pem' }), // the same address, another name
      web(lab.web2, { ip: lab.web2 }),
    )
    assert.deepEqual(oks(answers), [true, false, false], JSON.stringify(answers))
    const info = await sandbox.getInfo()
    assert.deepEqual(info.network.allowOut, ['allowed.test'])
    assert.deepEqual(info.network.denyOut, [ALL_TRAFFIC])
  })

  test('sandbox.updateNetwork() replaces the rules of a running sandbox', async (t) => {
    const sandbox = await create(t)
    assert.deepEqual(oks(await probe(sandbox, web(lab.web, { ip: lab.web }))), [true])
    await sandbox.updateNetwork({ denyOut: [lab.web] })
    const answers = await probe(sandbox, web(lab.web, { ip: lab.web }), web(lab.web2, { ip: lab.web2 }))
    assert.deepEqual(oks(answers), [false, true])
    assert.deepEqual((await sandbox.getInfo()).network.denyOut, [lab.web])
  })

  test('network.rules add a header on the host; the sandbox never holds it', async (t) => {
    const secret = 'js-netlab-' + 'c0ffee42'
    const sandbox = await create(t, {
      network: {
        allowOut: ['allowed.test'],
        denyOut: [ALL_TRAFFIC],
        rules: { 'allowed.test': [{ transform: { headers: { 'X-Api-Key': secret } } }] },
      },
    })
    const answers = await probe(sandbox, web('allowed.test', { tls: true, path: '/whoami?via=js' }))
    assert.deepEqual(oks(answers), [true], JSON.stringify(answers))
    const seen = readFileSync(join(lab.labDir, 'requests.jsonl'), 'utf8')
      .split('\n')
      .filter(Boolean)
      .map((line) => JSON.parse(line))
      .filter((r) => r.path === '/whoami?via=js')
    assert.equal(seen.length, 1)
    assert.equal(seen[0].headers['X-Api-Key'], secret)
    assert.ok(!JSON.stringify(answers).includes(secret))
  })

  test('network: { allowPublicTraffic: false }: the sandbox URL needs the traffic token', async (t) => {
    const sandbox = await create(t, { network: { allowPublicTraffic: false } })
    await sandbox.commands.run('python3 -m http.server 8000 >/dev/null 2>&1', { background: true })
    assert.ok(sandbox.trafficAccessToken)
    const host = sandbox.getHost(8000)
    const get = (headers) => fetch(`${lab.E2B_API_URL}/`, { headers: { 'E2b-Sandbox-Id': sandbox.sandboxId, 'E2b-Sandbox-Port': '8000', ...headers } })
    let served
    for (let i = 0; i < 50; i++) {
      served = await get({ 'e2b-traffic-access-token': sandbox.trafficAccessToken })
      await served.arrayBuffer()
      if (served.status === 200) break
      await new Promise((r) => setTimeout(r, 100))
    }
    assert.equal(served.status, 200)
    const refused = await get({})
    assert.equal(refused.status, 403)
    assert.match((await refused.json()).message, /traffic access token/)
    assert.ok(host.startsWith(`8000-${sandbox.sandboxId}.`))
  })
})
