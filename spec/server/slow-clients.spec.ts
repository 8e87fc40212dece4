/**
 * Slow clients: a connection that never finishes its headers, or its body, must not hold the
 * server's sockets for Node's defaults (60 s of headers, then 5 minutes of request). The real
 * server process (`cellcds serve`) cuts them off: headers within 20 s, the whole request within
 * 120 s (checked every 5 s).
 */
import fs from 'node:fs';
import net from 'node:net';
import os from 'node:os';
import path from 'node:path';
import { expect } from 'chai';
import { freePort, startServer, type ServerProcess } from '../helpers/processes.ts';

describe('cellcds serve: slow clients are cut off', function () {
  this.timeout(120_000);
  let dataDir: string;
  let server: ServerProcess;
  let port: number;

  before(async () => {
    dataDir = fs.mkdtempSync(path.join(os.tmpdir(), 'cellcds-slow-'));
    port = await freePort();
    server = await startServer({
      ...process.env,
      PORT: String(port),
      CELLCDS_DATA_DIR: dataDir,
      CELLCDS_ADMIN_TOKEN: '',
      CELLCDS_PUBLIC_URL: '',
    });
  });
  after(() => {
    server.child.kill('SIGTERM');
    fs.rmSync(dataDir, { recursive: true, force: true });
  });

  it('closes a connection whose headers never end (408 or close) within the headers timeout', async () => {
    const socket = net.connect(port, '127.0.0.1');
    socket.on('error', () => undefined);
    await new Promise((resolve) => socket.once('connect', resolve));
    const started = Date.now();
    socket.write('POST /cds-services/x HTTP/1.1\r\nHost: localhost\r\nX-Slow: ');
    let answer = '';
    socket.on('data', (d: Buffer) => (answer += d.toString()));
    await new Promise((resolve) => socket.once('close', resolve));
    const seconds = (Date.now() - started) / 1000;
    // Node's default would wait 60 s before even looking; 20 s + one 5-s check here.
    expect(seconds).to.be.lessThan(45);
    expect(answer === '' || answer.startsWith('HTTP/1.1 408')).to.equal(true);
  });
});
