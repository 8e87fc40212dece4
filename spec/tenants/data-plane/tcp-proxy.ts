/**
 * A throwaway TCP proxy in front of the test PostgreSQL, for outage specs: it can cap the
 * connections it lets through (like `max_connections`: extra ones are closed at once), refuse
 * every new one, or stall (stop forwarding bytes, like a network that stopped answering). The
 * real server is never touched.
 */
import net from 'node:net';

export interface TcpProxy {
  /** `postgres://...` of the target with the proxy's port. */
  url: string;
  /** Connections beyond this many open ones are closed at once (Infinity: no cap). */
  maxConns: number;
  /** Open connections now. */
  open(): number;
  /** Stops forwarding (both ways) on every connection, existing and new, until resumed. */
  stall(): void;
  resume(): void;
  /** Closes every connection (a database restart, as the client sees it). */
  dropAll(): void;
  close(): Promise<void>;
}

export async function startTcpProxy(targetUrl: string): Promise<TcpProxy> {
  const target = new URL(targetUrl);
  const pairs = new Set<[net.Socket, net.Socket]>();
  let stalled = false;
  const server = net.createServer((client) => {
    if (pairs.size >= proxy.maxConns) {
      client.destroy();
      return;
    }
    const upstream = net.connect(Number(target.port || 5432), target.hostname);
    const pair: [net.Socket, net.Socket] = [client, upstream];
    pairs.add(pair);
    if (stalled) {
      client.pause();
      upstream.pause();
    } else {
      client.pipe(upstream);
      upstream.pipe(client);
    }
    const end = () => {
      client.destroy();
      upstream.destroy();
      pairs.delete(pair);
    };
    for (const s of pair) {
      s.on('error', end);
      s.on('close', end);
    }
  });
  await new Promise<void>((resolve) => server.listen(0, '127.0.0.1', resolve));
  const port = (server.address() as net.AddressInfo).port;
  const url = new URL(targetUrl);
  url.hostname = '127.0.0.1';
  url.port = String(port);
  const proxy: TcpProxy = {
    url: url.toString(),
    maxConns: Number.POSITIVE_INFINITY,
    open: () => pairs.size,
    stall() {
      stalled = true;
      for (const [a, b] of pairs) {
        a.unpipe(b);
        b.unpipe(a);
        a.pause();
        b.pause();
      }
    },
    resume() {
      stalled = false;
      for (const [a, b] of pairs) {
        a.pipe(b);
        b.pipe(a);
        a.resume();
        b.resume();
      }
    },
    dropAll() {
      for (const [a, b] of pairs) {
        a.destroy();
        b.destroy();
      }
      pairs.clear();
    },
    async close() {
      proxy.dropAll();
      await new Promise<void>((resolve) => {
        server.close(() => {
          resolve();
        });
      });
    },
  };
  return proxy;
}
