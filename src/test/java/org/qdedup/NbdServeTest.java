package org.qdedup;

import static org.assertj.core.api.Assertions.assertThat;

import java.net.StandardProtocolFamily;
import java.net.UnixDomainSocketAddress;
import java.nio.ByteBuffer;
import java.nio.channels.SocketChannel;
import java.nio.charset.StandardCharsets;
import java.nio.file.Files;
import java.nio.file.Path;
import java.util.ArrayList;
import java.util.List;
import java.util.Random;
import java.util.concurrent.TimeUnit;
import org.junit.jupiter.api.Test;
import org.junit.jupiter.api.io.TempDir;

/** `qdedup serve` driven by real NBD clients: nbdinfo, nbdcopy, qemu-img and qemu-io, over a unix socket and TCP. */
class NbdServeTest {
    @TempDir
    Path dir;

    /** A running `qdedup serve` in its own JVM, as users run it. */
    final class Server extends ServeProcess {
        Server(String... args) throws Exception {
            super(dir, args);
        }
    }

    private Qemu.Result run(String... cmd) {
        Qemu.Result r = Qemu.exec(dir, List.of(cmd)).ok();
        if (cmd[0].equals("qemu-io")) {
            assertThat(r.out() + r.err()).as("qemu-io output").doesNotContain("failed");
        }
        return r;
    }

    private long hostClusters(String img, long cs) {
        return Qemu.hostClusters(dir, img, cs);
    }

    @Test
    void realClientsOverAUnixSocketWithDedup() throws Exception {
        String img = dir.resolve("d.qcow2").toString();
        assertThat(FormatMatrixTest.cli("create", "-o", "cluster_size=4k", img, "16M").rc()).isZero();
        // a disk with copies: 1 MiB of random data four times, and some zeros
        byte[] block = new byte[1 << 20];
        new Random(5).nextBytes(block);
        byte[] disk = new byte[16 << 20];
        for (int i = 0; i < 4; i++) {
            System.arraycopy(block, 0, disk, i * (3 << 20), block.length);
        }
        Files.write(dir.resolve("src.raw"), disk);
        String sock = dir.resolve("s.sock").toString();
        try (Server s = new Server("--socket", sock, "--dedup", "--pid-file", "pid", "--metrics", "m.json", img)) {
            assertThat(s.uri).isEqualTo("nbd+unix:///?socket=" + sock);
            assertThat(Files.readString(dir.resolve("pid")).strip()).isEqualTo(Long.toString(s.p.pid()));
            String info = run("nbdinfo", s.uri).out();
            assertThat(info).contains("export-size: 16777216").contains("base:allocation").contains("can_trim: true")
                    .contains("is_read_only: false");
            run("nbdcopy", dir.resolve("src.raw").toString(), s.uri);
            run("qemu-img", "compare", "-f", "raw", "-F", "raw", dir.resolve("src.raw").toString(), s.uri);
            run("nbdcopy", s.uri, dir.resolve("back.raw").toString());
            run("qemu-img", "convert", "-n", "-f", "raw", "-O", "raw", dir.resolve("src.raw").toString(), s.uri);
            assertThat(Files.mismatch(dir.resolve("src.raw"), dir.resolve("back.raw"))).isEqualTo(-1);
            // qemu-io pattern writes and reads, a write of zeros and a discard
            run("qemu-io", "-f", "raw", "-c", "write -P 0x5a 13M 64k", "-c", "read -P 0x5a 13M 64k",
                    "-c", "write -z 0 64k", "-c", "discard 64k 64k", "-c", "read -P 0 0 128k", s.uri);
            java.util.Arrays.fill(disk, 13 << 20, (13 << 20) + 65536, (byte) 0x5a);
            java.util.Arrays.fill(disk, 0, 128 << 10, (byte) 0);
            Files.write(dir.resolve("expect.raw"), disk);
            run("qemu-img", "compare", "-f", "raw", "-F", "raw", dir.resolve("expect.raw").toString(), s.uri);
            String map = run("nbdinfo", "--map", s.uri).out();
            assertThat(map).contains("hole,zero").contains("data");
            assertThat(s.stop()).as("exit status after SIGTERM").isZero();
        }
        assertThat(Files.exists(dir.resolve("s.sock"))).as("socket removed").isFalse();
        FormatMatrixTest.assertClean(dir, img);
        run("qemu-img", "compare", "-f", "qcow2", "-F", "raw", img, dir.resolve("expect.raw").toString());
        // 1 MiB stored once although written four times (less the 128 KiB now zero), plus 16 clusters of 0x5a once
        assertThat(hostClusters(img, 4096)).isEqualTo(256 - 0 + 1);
        String metrics = Files.readString(dir.resolve("m.json"));
        assertThat(metrics).contains("\"writes\": ").contains("\"ceiling-hits\": 0")
                .contains("\"index-state\": \"in-sync\"").doesNotContain("\"dedup-hits\": 0,");
        assertThat(FormatMatrixTest.cli("check", img).out()).contains("Dedup index: in sync");
    }

    @Test
    void tcpReadOnlyAndHostileClients() throws Exception {
        String img = dir.resolve("t.qcow2").toString();
        Qemu.img(dir, "create", "-f", "qcow2", img, "8M");
        Qemu.io(dir, "qcow2", img, List.of("write -P 7 1M 1M"));
        try (Server s = new Server("--port", "0", "-x", "disk", "-r", img)) {
            assertThat(s.uri).startsWith("nbd://127.0.0.1:").endsWith("/disk");
            assertThat(run("nbdinfo", s.uri).out()).contains("is_read_only: true");
            run("qemu-img", "compare", "-f", "qcow2", "-F", "raw", img, s.uri);
            run("qemu-img", "convert", "-f", "raw", "-O", "raw", s.uri, dir.resolve("tcp.raw").toString());
            run("qemu-img", "compare", "-f", "qcow2", "-F", "raw", img, dir.resolve("tcp.raw").toString());
            Qemu.Result w = Qemu.exec(dir, List.of("qemu-io", "-f", "raw", "-c", "write -P 1 0 4k", s.uri));
            assertThat(w.exit() != 0 || (w.out() + w.err()).contains("failed")).as("write to a read-only export fails").isTrue();
            // a client that sends garbage is dropped; the server keeps serving others
            int port = Integer.parseInt(s.uri.replaceAll(".*:(\\d+)/.*", "$1"));
            try (SocketChannel c = SocketChannel.open(new java.net.InetSocketAddress("127.0.0.1", port))) {
                ByteBuffer greet = ByteBuffer.allocate(18);
                while (greet.hasRemaining() && c.read(greet) >= 0) {
                }
                c.write(ByteBuffer.wrap(new byte[]{0, 0, 0, 3})); // fixed newstyle + no zeroes
                c.write(ByteBuffer.wrap("this is not an NBD option at all".getBytes(StandardCharsets.US_ASCII)));
                ByteBuffer rest = ByteBuffer.allocate(64);
                int got;
                try {
                    got = c.read(rest);
                } catch (java.net.SocketException reset) {
                    got = -1; // hung up before reading all we sent: a reset
                }
                assertThat(got).as("server hangs up on a bad option magic").isEqualTo(-1);
            }
            run("qemu-img", "compare", "-f", "qcow2", "-F", "raw", img, s.uri);
            assertThat(s.stop()).isZero();
        }
        FormatMatrixTest.assertClean(dir, img);
    }

    static long distinctNonZero(Path raw, int cs) throws Exception {
        byte[] all = Files.readAllBytes(raw);
        java.util.Set<String> seen = new java.util.HashSet<>();
        byte[] zero = new byte[cs];
        java.security.MessageDigest md = java.security.MessageDigest.getInstance("SHA-256");
        for (int off = 0; off + cs <= all.length; off += cs) {
            if (!java.util.Arrays.equals(all, off, off + cs, zero, 0, cs)) {
                md.update(all, off, cs);
                seen.add(java.util.HexFormat.of().formatHex(md.digest()));
            }
        }
        return seen.size();
    }

    private static List<String> fioJob(String... engine) {
        List<String> cmd = new ArrayList<>(List.of("fio", "--name=dedup", "--rw=randwrite", "--bs=4k", "--size=16M",
                "--iodepth=1", "--dedupe_percentage=60", "--randseed=4242", "--output=/dev/null"));
        cmd.addAll(List.of(engine));
        return cmd;
    }

    @Test
    void fioDuplicateWritesMatchTheSameJobOnARawFileAndAreStoredOnce() throws Exception {
        String img = dir.resolve("f.qcow2").toString();
        assertThat(FormatMatrixTest.cli("create", "--dedup", img, "16M").rc()).isZero();
        Path raw = dir.resolve("f.raw");
        Qemu.exec(dir, fioJob("--ioengine=psync", "--filename=" + raw)).ok();
        try (Server s = new Server("--socket", dir.resolve("f.sock").toString(), img)) {
            Qemu.exec(dir, fioJob("--ioengine=nbd", "--uri=" + s.uri)).ok();
            run("qemu-img", "compare", "-f", "raw", "-F", "raw", raw.toString(), s.uri);
            assertThat(s.stop()).isZero();
        }
        FormatMatrixTest.assertClean(dir, img);
        run("qemu-img", "compare", "-f", "qcow2", "-F", "raw", img, raw.toString());
        long distinct = distinctNonZero(raw, 4096);
        assertThat(distinct).as("fio reused buffers").isLessThan(4096 * 7 / 10);
        assertThat(hostClusters(img, 4096)).as("stored data clusters = distinct non-zero clusters").isEqualTo(distinct);
    }

    @Test
    void fioVerifiesItsWritesAtIodepth16() throws Exception {
        String img = dir.resolve("v.qcow2").toString();
        assertThat(FormatMatrixTest.cli("create", "--dedup", img, "32M").rc()).isZero();
        try (Server s = new Server("--socket", dir.resolve("v.sock").toString(), img)) {
            Qemu.exec(dir, List.of("fio", "--name=verify", "--ioengine=nbd", "--uri=" + s.uri, "--rw=randwrite",
                    "--bs=4k", "--size=32M", "--iodepth=16", "--verify=crc32c", "--do_verify=1", "--randseed=7",
                    "--output=/dev/null")).ok();
            assertThat(s.stop()).isZero();
        }
        FormatMatrixTest.assertClean(dir, img);
    }

    /** A minimal NBD client speaking the protocol by hand, to send what real clients never send. */
    static final class RawClient implements AutoCloseable {
        final SocketChannel c;

        RawClient(Path socket) throws Exception {
            c = SocketChannel.open(StandardProtocolFamily.UNIX);
            c.connect(UnixDomainSocketAddress.of(socket));
            read(18);
            c.write(ByteBuffer.allocate(4).putInt(3).flip());
            // NBD_OPT_STRUCTURED_REPLY is not asked for: simple replies, easy to read here
            byte[] name = new byte[0];
            ByteBuffer go = ByteBuffer.allocate(16 + 4 + name.length + 2).putLong(0x49484156454F5054L).putInt(7)
                    .putInt(4 + name.length + 2).putInt(name.length).put(name).putShort((short) 0).flip();
            c.write(go);
            for (;;) {
                ByteBuffer h = read(20);
                h.getLong();
                h.getInt();
                int type = h.getInt();
                int len = h.getInt();
                read(len);
                if (type == 1) {
                    return; // ACK: transmission
                }
            }
        }

        ByteBuffer read(int n) throws Exception {
            ByteBuffer b = ByteBuffer.allocate(n);
            while (b.hasRemaining()) {
                if (c.read(b) < 0) {
                    throw new java.io.EOFException();
                }
            }
            return b.flip();
        }

        void request(int type, long offset, long length, byte[] payload) throws Exception {
            request(type, 0, offset, length, payload);
        }

        /** A request with command flags (1: FUA). */
        void request(int type, int flags, long offset, long length, byte[] payload) throws Exception {
            ByteBuffer r = ByteBuffer.allocate(28).putInt(0x25609513).putShort((short) flags).putShort((short) type)
                    .putLong(77).putLong(offset).putInt((int) length).flip();
            c.write(r);
            if (payload != null) {
                c.write(ByteBuffer.wrap(payload));
            }
        }

        /** The error of the next simple reply (its data, if any, is left unread). */
        int replyError() throws Exception {
            ByteBuffer h = read(16);
            assertThat(h.getInt()).as("simple reply magic").isEqualTo(0x67446698);
            return h.getInt();
        }

        @Override
        public void close() throws Exception {
            c.close();
        }
    }

    @Test
    void brokenRequestsGetErrorsOrADisconnectAndOthersAreServed() throws Exception {
        String img = dir.resolve("h.qcow2").toString();
        Qemu.img(dir, "create", "-f", "qcow2", img, "4M");
        Qemu.io(dir, "qcow2", img, List.of("write -P 9 0 1M"));
        Path sock = dir.resolve("h.sock");
        try (Server s = new Server("--socket", sock.toString(), img)) {
            try (RawClient c = new RawClient(sock)) {
                c.request(0, 4L << 20, 4096, null); // READ past the end
                assertThat(c.replyError()).isEqualTo(22);
                c.request(1, (4L << 20) - 10, 20, new byte[20]); // WRITE past the end
                assertThat(c.replyError()).isEqualTo(22);
                c.request(99, 0, 0, null); // unknown command
                assertThat(c.replyError()).isEqualTo(22);
                c.request(0, 0, 64L << 20, null); // READ over the 32 MiB limit
                assertThat(c.replyError()).isEqualTo(75);
                c.request(7, 0, 4096, null); // BLOCK_STATUS without structured replies
                assertThat(c.replyError()).isEqualTo(22);
                c.request(0, 0, 4096, null); // and still a good read
                assertThat(c.replyError()).isZero();
                assertThat(c.read(4096).get(0)).isEqualTo((byte) 9);
            }
            try (RawClient c = new RawClient(sock)) {
                c.request(1, 0, 1 << 20, new byte[1000]); // disconnects in the middle of a write's payload
            }
            try (RawClient c = new RawClient(sock)) {
                c.request(1, 0, 0xffff_fff0L, null); // a write of almost 4 GiB: refused, then disconnected
                assertThat(c.replyError()).isEqualTo(75);
                ByteBuffer more = ByteBuffer.allocate(1);
                int got;
                try {
                    got = c.c.read(more);
                } catch (java.io.IOException reset) {
                    got = -1;
                }
                assertThat(got).isEqualTo(-1);
            }
            run("qemu-io", "-f", "raw", "-c", "read -P 9 0 1M", "-c", "read -P 0 1M 3M", s.uri);
            assertThat(s.stop()).isZero();
        }
        FormatMatrixTest.assertClean(dir, img);
        Qemu.io(dir, "qcow2", img, List.of("read -P 9 0 1M", "read -P 0 1M 3M"));
    }

    @Test
    void twoConnectionsWritingTheSameNewContentAtOnceStoreItOnceAndAKilledClientHarmsNothing() throws Exception {
        String img = dir.resolve("two.qcow2").toString();
        assertThat(FormatMatrixTest.cli("create", "--dedup", img, "16M").rc()).isZero();
        Path sock = dir.resolve("two.sock");
        try (Server s = new Server("--socket", sock.toString(), img)) {
            // the same 1 MiB pattern written by two clients at once, each to its own half of the disk
            List<Process> ps = new ArrayList<>();
            for (int k = 0; k < 2; k++) {
                List<String> cmd = new ArrayList<>(List.of("qemu-io", "-f", "raw"));
                for (int i = 0; i < 8; i++) {
                    cmd.addAll(List.of("-c", "write -P 0x3c " + ((k * 8 + i) << 20) + " 1M"));
                }
                cmd.add(s.uri);
                ps.add(new ProcessBuilder(cmd).redirectErrorStream(true).redirectOutput(ProcessBuilder.Redirect.DISCARD).start());
            }
            for (Process p : ps) {
                assertThat(p.waitFor(60, TimeUnit.SECONDS)).isTrue();
                assertThat(p.exitValue()).isZero();
            }
            // a client killed in the middle of its requests (--thread: one process, so the kill stops every job)
            Process victim = new ProcessBuilder("fio", "--name=victim", "--thread", "--ioengine=nbd", "--uri=" + s.uri, "--rw=randwrite",
                    "--bs=64k", "--size=16M", "--iodepth=16", "--time_based", "--runtime=30", "--output=/dev/null")
                    .redirectErrorStream(true).redirectOutput(ProcessBuilder.Redirect.DISCARD).start();
            Thread.sleep(1500);
            victim.destroyForcibly();
            victim.waitFor();
            // the server still serves, and the disk is whatever the writes left: readable, then rewritten
            run("qemu-io", "-f", "raw", "-c", "write -P 0x3c 0 16M", "-c", "read -P 0x3c 0 16M", s.uri);
            assertThat(s.stop()).isZero();
        }
        FormatMatrixTest.assertClean(dir, img);
        assertThat(hostClusters(img, 4096)).as("one pattern cluster for 16 MiB written by three clients").isEqualTo(1);
    }

    /**
     * Big READs go from the file to the socket (sendfile) where the data lies as it is and through a buffer
     * elsewhere: over a QEMU-made image with compressed clusters, zero clusters, unallocated parts falling through
     * to a backing file and past its end, every 1 MiB read (simple replies) and qemu-img compare (structured replies)
     * see what qemu-img convert sees.
     */
    @Test
    @org.junit.jupiter.api.Timeout(120) // a reply shorter than its header says leaves the client waiting: fail, not hang
    void bigReadsAcrossDataZeroCompressedAndBackingPartsReadAsQemuReadsThem() throws Exception {
        run("qemu-img", "create", "-f", "qcow2", "-o", "cluster_size=64k", "base.qcow2", "3M");
        run("qemu-io", "-c", "write -P 0x11 0 3M", "base.qcow2");
        run("qemu-img", "create", "-f", "qcow2", "-o", "cluster_size=64k", "-b", "base.qcow2", "-F", "qcow2", "top.qcow2", "8M");
        run("qemu-io", "-c", "write -P 0x22 64k 192k", "-c", "write -c -P 0x33 512k 128k", "-c", "write -z 1M 256k",
                "-c", "write -P 0x44 1100k 7k", "-c", "write -c -P 0x55 3M 64k", "-c", "write -P 0x66 5M 1M", "top.qcow2");
        run("qemu-img", "convert", "-O", "raw", "top.qcow2", "top.raw");
        byte[] want = Files.readAllBytes(dir.resolve("top.raw"));
        Path sock = dir.resolve("big.sock");
        try (Server s = new Server("--socket", sock.toString(), "-r", "top.qcow2")) {
            try (RawClient c = new RawClient(sock)) {
                for (long off = 0; off + (1 << 20) <= want.length; off += 320 << 10) {
                    c.request(0, off, 1 << 20, null);
                    assertThat(c.replyError()).as("read at %d", off).isZero();
                    byte[] got = c.read(1 << 20).array();
                    assertThat(java.util.Arrays.mismatch(got, 0, got.length, want, (int) off, (int) off + got.length))
                            .as("1 MiB read at %d: first wrong byte", off).isEqualTo(-1);
                }
            }
            run("qemu-img", "compare", "-f", "raw", "top.raw", s.uri);
            assertThat(s.stop()).isZero();
        }
    }

    /**
     * A client that sends big READs and never takes the replies: the threads sending to it block (with the I/O gate
     * held while sendfile runs); another client still writes, discards, flushes (its frees wait at most a moment for
     * the gate, then for a later flush) and reads, and the server stops cleanly once the stuck client goes.
     */
    @Test
    void aClientThatStopsReadingItsRepliesStallsOnlyItself() throws Exception {
        String img = dir.resolve("stuck.qcow2").toString();
        assertThat(FormatMatrixTest.cli("create", "--dedup", img, "64M").rc()).isZero();
        run("qemu-io", "-c", "write -P 0x21 0 32M", img);
        Path sock = dir.resolve("stuck.sock");
        try (Server s = new Server("--socket", sock.toString(), img)) {
            RawClient stuck = new RawClient(sock);
            for (int i = 0; i < 64; i++) {
                stuck.request(0, (long) (i % 32) << 20, 1 << 20, null); // 64 MiB of replies nobody reads
            }
            Thread.sleep(1000);
            java.util.concurrent.atomic.AtomicReference<Throwable> err = new java.util.concurrent.atomic.AtomicReference<>();
            Thread other = Thread.ofPlatform().start(() -> {
                try (RawClient c = new RawClient(sock)) {
                    byte[] data = new byte[1 << 20];
                    java.util.Arrays.fill(data, (byte) 0x5a);
                    for (int round = 0; round < 3; round++) {
                        c.request(1, 40L << 20, data.length, data);
                        assertThat(c.replyError()).as("write").isZero();
                        c.request(4, 0, 1 << 20, null); // trim: a cluster to free at the flush
                        assertThat(c.replyError()).as("trim").isZero();
                        c.request(3, 0, 0, null);
                        assertThat(c.replyError()).as("flush").isZero();
                        c.request(0, 40L << 20, 128 << 10, null);
                        assertThat(c.replyError()).as("read").isZero();
                        assertThat(c.read(128 << 10).array()).containsOnly((byte) 0x5a);
                    }
                } catch (Throwable t) {
                    err.set(t);
                }
            });
            other.join(TimeUnit.SECONDS.toMillis(60));
            assertThat(other.isAlive()).as("the other client still waiting after 60 s: stalled by the stuck one").isFalse();
            assertThat(err.get()).isNull();
            stuck.close();
            assertThat(s.stop()).isZero();
        }
        FormatMatrixTest.assertClean(dir, img);
    }

    @Test
    void noDedupStoresCopiesAndKeepsTheIndexRightAndOneClientAtATime() throws Exception {
        String img = dir.resolve("nd.qcow2").toString();
        assertThat(FormatMatrixTest.cli("create", "--dedup", img, "8M").rc()).isZero();
        Path sock = dir.resolve("nd.sock");
        try (Server s = new Server("--socket", sock.toString(), "--no-dedup", "-e", "1", img)) {
            run("qemu-io", "-f", "raw", "-c", "write -P 0x44 0 64k", "-c", "write -P 0x44 1M 64k", s.uri);
            // -e 1: while one client is connected, a second one is turned away
            try (RawClient first = connectWhenFree(sock)) {
                Qemu.Result second = Qemu.exec(dir, List.of("nbdinfo", s.uri));
                assertThat(second.exit()).as("second client while -e 1 is taken").isNotZero();
            }
            assertThat(s.stop()).isZero();
        }
        assertThat(hostClusters(img, 4096)).as("--no-dedup: both copies stored").isEqualTo(32);
        try (Server s = new Server("--socket", sock.toString(), img)) {
            run("qemu-io", "-f", "raw", "-c", "write -P 0x44 2M 64k", "-c", "read -P 0x44 0 64k", s.uri);
            assertThat(s.stop()).isZero();
        }
        assertThat(hostClusters(img, 4096)).as("dedup on again: the new copy shares the stored one").isEqualTo(32);
        try (org.qdedup.image.Qcow2Image q = org.qdedup.image.Images.openWritable(img, org.qdedup.image.OpenOptions.defaults())) {
            q.write(ByteBuffer.wrap(new byte[0]), 0);
            assertThat(q.writer().staleDedupEntries()).isZero();
        }
        FormatMatrixTest.assertClean(dir, img);
    }

    /** Connects once the server has released the slot of the previous client (it does so asynchronously). */
    private static RawClient connectWhenFree(Path sock) throws Exception {
        long deadline = System.nanoTime() + 10_000_000_000L;
        for (;;) {
            try {
                return new RawClient(sock);
            } catch (java.io.IOException e) {
                if (System.nanoTime() > deadline) {
                    throw e;
                }
                Thread.sleep(50);
            }
        }
    }
}
