import { Sandbox, FilesystemEventType } from '@e2b/code-interpreter'
import { startRuntime, sleep } from './runtime.mjs'
process.env.SANDBOXD_PYTHON = '/work/.venv-dev/bin/python'
const rt = await startRuntime()
try {
  const sandbox = await Sandbox.create()
  const events = []
  const handle = await sandbox.files.watchDir('/home/user', async (e) => { events.push(e) }, { recursive: true })
  await sandbox.files.write('/home/user/my-folder/my-file', 'hello')
  await sleep(500)
  console.log('recursive', events)
  await handle.stop()
  const ev2 = []
  const h2 = await sandbox.files.watchDir('/home/user', (e) => ev2.push(e))
  await sandbox.files.write('/home/user/my-file', 'hello')
  await sleep(500)
  console.log('plain', ev2); await h2.stop()
  const out = []
  const command = await sandbox.commands.run('echo hello; sleep 10; echo world', { background: true, onStdout: (d) => out.push(d) })
  await sleep(300)
  console.log('bg out', out, command.pid)
  console.log('kill', await command.kill())
  try { console.log('wait', await command.wait()) } catch (e) { console.log('wait err', e.constructor.name, e.message, e.exitCode) }
  console.log(await sandbox.commands.list())
  console.log(await sandbox.commands.run('ls -l'))
  console.log(await sandbox.commands.run('whoami; stat -c %U:%G /path/to/file 2>&1; ls -ld /path /path/to', {}).catch(e => e))
  await sandbox.files.write('/path/to/file', 'file content')
  console.log(await sandbox.commands.run('stat -c %U:%G /path/to/file /path/to /path; ls -ld /path/to'))
  try { await Sandbox.connect('doesnotexist00000000') } catch (e) { console.log('connect err', e.constructor.name, e.message) }
  try { await sandbox.files.read('/nope') } catch (e) { console.log('read err', e.constructor.name, e.message) }
  const info = await sandbox.getInfo(); console.log(info)
} finally {
  console.log(rt.readLog().slice(-2000))
  await rt.stop()
}
