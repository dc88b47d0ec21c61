package org.qdedup;

import static org.assertj.core.api.Assertions.assertThat;

import java.io.BufferedReader;
import java.io.InputStreamReader;
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
    final class Server implements AutoCloseable {
        final Process p;
        final String uri;

        Server(String... args) throws Exception {
            List<String> cmd = new ArrayList<>(List.of(Path.of(System.getProperty("java.home"), "bin", "java").toString(),
                    "--enable-native-access=ALL-UNNAMED", "-cp", System.getProperty("java.class.path"),
                    "org.qdedup.cli.Main", "serve"));
            cmd.addAll(List.of(args));
            p = new ProcessBuilder(cmd).directory(dir.toFile()).redirectError(dir.resolve("serve.err").toFile()).start();
            BufferedReader r = new BufferedReader(new InputStreamReader(p.getInputStream(), StandardCharsets.UTF_8));
            String line = r.readLine();
            assertThat(line).as("ready line; stderr: %s", Files.exists(dir.resolve("serve.err"))
                    ? Files.readString(dir.resolve("serve.err")) : "").isNotNull().startsWith("qdedup: serving ");
            uri = line.substring(line.indexOf(" on ") + 4);
        }

        /** SIGTERM: the server finishes, flushes, saves the index and exits 0. */
        int stop() throws Exception {
            p.toHandle().destroy();
            assertThat(p.waitFor(30, TimeUnit.SECONDS)).as("server exits after SIGTERM").isTrue();
            return p.exitValue();
        }

        @Override
        public void close() {
            p.destroyForcibly();
        }
    }

    private Qemu.Result run(String... cmd) {
        return Qemu.exec(dir, List.of(cmd)).ok();
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
        assertThat(metrics).contains("\"writes\": ").contains("\"dedup-hits\": ").contains("\"ceiling-hits\": 0");
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

    private static long distinctNonZero(Path raw, int cs) throws Exception {
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
}
