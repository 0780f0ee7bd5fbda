import dc from 'node:diagnostics_channel'
import { Sandbox } from '@e2b/code-interpreter'
import { startRuntime, sleep } from './runtime.mjs'
dc.subscribe('undici:client:sendHeaders', ({ request, headers }) => { console.log('>>', request.method, request.path, JSON.stringify(headers)) })
dc.subscribe('undici:request:headers', ({ request, response }) => { console.log('<<', response.statusCode, request.path, response.headers.map(String).join(' | ')) })
process.env.SANDBOXD_PYTHON = '/work/.venv-dev/bin/python'
const rt = await startRuntime()
try {
  const sandbox = await Sandbox.create()
  await sandbox.files.write('/home/user/t.txt', 'x'.repeat(100000))
  const s = await sandbox.files.read('/home/user/t.txt'); console.log(s.length)
  await sandbox.files.write([{path: '/home/user/a', data: 'A'}, {path: '/home/user/b', data: 'B'}])
  await sandbox.commands.run('echo hi')
  const h = await sandbox.files.watchDir('/home/user', () => {}, {recursive: true}); await h.stop()
  await sandbox.setTimeout(30000)
  const p = Sandbox.list({ query: { metadata: {k: 'v w'}, state: ['running', 'paused'] }, limit: 5 }); await p.nextItems()
  await Sandbox.connect(sandbox.sandboxId)
  console.log(await sandbox.isRunning())
  await sandbox.kill()
  console.log(await sandbox.isRunning())
} finally { await rt.stop() }
