package org.qdedup.cli;

import java.io.IOException;
import java.io.PrintStream;
import java.net.InetSocketAddress;
import java.net.StandardProtocolFamily;
import java.net.UnixDomainSocketAddress;
import java.nio.channels.ServerSocketChannel;
import java.nio.charset.StandardCharsets;
import java.nio.file.Files;
import java.nio.file.Path;
import java.nio.file.StandardCopyOption;
import java.util.LinkedHashMap;
import java.util.Map;
import java.util.concurrent.Callable;
import org.qdedup.image.BlockDevice;
import org.qdedup.image.DedupStats;
import org.qdedup.image.ImageOps;
import org.qdedup.image.Images;
import org.qdedup.image.OpenOptions;
import org.qdedup.image.Qcow2Image;
import org.qdedup.nbd.NbdServer;
import picocli.CommandLine.Command;
import picocli.CommandLine.Option;
import picocli.CommandLine.Parameters;

@Command(name = "serve", description = "Serve an image over NBD until SIGTERM or SIGINT (then finish requests in "
        + "flight, flush, save the dedup index and exit 0).")
final class ServeCommand implements Callable<Integer> {
    @Option(names = "--socket", paramLabel = "PATH", description = "Listen on a unix socket instead of TCP.")
    String socket;
    @Option(names = "--bind", paramLabel = "ADDR", defaultValue = "127.0.0.1", description = "TCP address (default 127.0.0.1).")
    String bind;
    @Option(names = "--port", paramLabel = "N", defaultValue = "10809", description = "TCP port (default 10809).")
    int port;
    @Option(names = "-x", paramLabel = "NAME", defaultValue = "", description = "Export name (default empty).")
    String exportName;
    @Option(names = "-r", description = "Read-only export.")
    boolean readOnly;
    @Option(names = "-t", description = "Accepted for qemu-nbd compatibility; the server always stays up.")
    boolean persistent;
    @Option(names = "-e", paramLabel = "N", defaultValue = "0", description = "Clients at once (default 0: any number).")
    int maxClients;
    @Option(names = "--dedup", description = "Enable dedup on the image (remembered).")
    boolean dedup;
    @Option(names = "--no-dedup", description = "Do not share clusters for new writes (the dedup index stays right).")
    boolean noDedup;
    @Option(names = "--pid-file", paramLabel = "FILE", description = "Write the process id here.")
    String pidFile;
    @Option(names = "--metrics", paramLabel = "FILE", description = "Write counters as JSON here on SIGUSR1 and at exit.")
    String metrics;
    @Parameters(paramLabel = "IMG")
    String image;

    @Override
    public Integer call() throws Exception {
        if (dedup && noDedup) {
            throw new CliException("--dedup and --no-dedup exclude each other");
        }
        if (dedup && readOnly) {
            throw new CliException("--dedup needs a writable export (not -r)");
        }
        if (dedup) {
            ImageOps.enableDedup(image);
        }
        PrintStream out = Context.out();
        NbdServer server;
        org.qdedup.dedup.Deduplicator.Counters counters;
        try (BlockDevice dev = readOnly ? Images.open(image, OpenOptions.defaults())
                : Images.openWritable(image, OpenOptions.defaults())) {
            if (noDedup && dev instanceof Qcow2Image q && q.writer() != null) {
                q.writer().dedupSharing(false);
            }
            ServerSocketChannel listener;
            String where;
            if (socket != null) {
                Path sp = Path.of(socket);
                if (Files.exists(sp) && !Files.isDirectory(sp) && !Files.isRegularFile(sp)) {
                    Files.delete(sp); // a stale socket of an earlier run
                }
                listener = ServerSocketChannel.open(StandardProtocolFamily.UNIX);
                listener.bind(UnixDomainSocketAddress.of(sp));
                where = "nbd+unix:///" + exportName + "?socket=" + socket;
            } else {
                listener = ServerSocketChannel.open();
                listener.bind(new InetSocketAddress(bind, port));
                where = "nbd://" + bind + ":" + ((InetSocketAddress) listener.getLocalAddress()).getPort() + "/" + exportName;
            }
            if (pidFile != null) {
                Files.writeString(Path.of(pidFile), ProcessHandle.current().pid() + "\n");
            }
            counters = dev instanceof Qcow2Image q0 && q0.writer() != null ? q0.writer().dedupCounters() : null;
            server = new NbdServer(dev, readOnly, exportName, maxClients, listener);
            NbdServer srv = server;
            Runnable stop = () -> {
                try {
                    srv.close();
                } catch (IOException ignored) {
                    // closing anyway
                }
            };
            sun.misc.Signal.handle(new sun.misc.Signal("TERM"), s -> stop.run());
            sun.misc.Signal.handle(new sun.misc.Signal("INT"), s -> stop.run());
            if (metrics != null) {
                var live = counters;
                sun.misc.Signal.handle(new sun.misc.Signal("USR1"), s -> writeMetrics(dev, srv, live));
            }
            out.println("qdedup: serving " + image + " on " + where);
            out.flush();
            try {
                server.serve();
            } finally {
                server.close();
                if (socket != null) {
                    Files.deleteIfExists(Path.of(socket));
                }
                if (dev instanceof Qcow2Image q && q.writer() != null) {
                    q.flush();
                }
            }
        }
        if (metrics != null) {
            // After the close, so that the index state is the one the next open finds.
            try (BlockDevice after = Images.open(image, new OpenOptions(null, true, null))) {
                writeMetrics(after, server, counters);
            }
        }
        return 0;
    }

    private void writeMetrics(BlockDevice dev, NbdServer server, org.qdedup.dedup.Deduplicator.Counters d) {
        try {
            Map<String, Object> m = new LinkedHashMap<>();
            if (dev instanceof Qcow2Image q) {
                m.putAll(StatsCommand.json(DedupStats.of(q)));
                if (q.writer() != null && q.writer().dedupIndexEntries() > 0) {
                    m.put("index-entries", (long) q.writer().dedupIndexEntries());
                }
            }
            NbdServer.Counters c = server.counters();
            m.put("reads", c.reads.get());
            m.put("writes", c.writes.get());
            m.put("flushes", c.flushes.get());
            m.put("trims", c.trims.get());
            m.put("zero-writes", c.zeroWrites.get());
            m.put("dedup-hits", d == null ? 0 : d.hits);
            m.put("dedup-misses", d == null ? 0 : d.misses);
            m.put("inplace-rewrites", d == null ? 0 : d.inplaceRewrites);
            m.put("backing-equal-writes", d == null ? 0 : d.backingEqual);
            m.put("unaligned-rmw", d == null ? 0 : d.unalignedRmw);
            m.put("ceiling-hits", d == null ? 0 : d.ceilingHits);
            Path p = Path.of(metrics);
            Path tmp = p.resolveSibling(p.getFileName() + ".tmp");
            Files.writeString(tmp, Json.pretty(m) + "\n", StandardCharsets.UTF_8);
            Files.move(tmp, p, StandardCopyOption.ATOMIC_MOVE, StandardCopyOption.REPLACE_EXISTING);
        } catch (IOException | RuntimeException e) {
            Context.err().println("qdedup: " + metrics + ": cannot write metrics: " + e.getMessage());
        }
    }
}
