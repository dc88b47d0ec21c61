package org.qdedup;

import static org.assertj.core.api.Assertions.assertThat;

import java.net.StandardProtocolFamily;
import java.net.UnixDomainSocketAddress;
import java.nio.ByteBuffer;
import java.nio.channels.ServerSocketChannel;
import java.nio.channels.SocketChannel;
import java.nio.file.Path;
import java.util.List;
import java.util.Random;
import org.junit.jupiter.api.io.TempDir;
import org.junit.jupiter.params.ParameterizedTest;
import org.junit.jupiter.params.provider.ValueSource;
import org.qdedup.image.BlockDevice;
import org.qdedup.image.Images;
import org.qdedup.image.OpenOptions;
import org.qdedup.nbd.NbdServer;

/**
 * Random and mutated NBD sessions against the server: handshakes with bad magic, lying lengths and unknown
 * options, requests of every type with random flags, offsets and lengths, payloads cut short. The server must
 * answer or hang up, keep serving a well-behaved client afterwards, and leave the image consistent (and, for a
 * read-only export, unchanged). {@code -Dqdedup.fuzz.sessions=N} runs more by hand.
 */
class NbdFuzzTest {
    @TempDir
    Path dir;

    static final int SESSIONS = Integer.getInteger("qdedup.fuzz.sessions", 300);

    @ParameterizedTest(name = "read-only={0}")
    @ValueSource(booleans = {true, false})
    void randomSessionsNeverHurtTheServerOrTheImage(boolean readOnly) throws Exception {
        String img = dir.resolve("f.qcow2").toString();
        Qemu.img(dir, "create", "-f", "qcow2", "-o", "cluster_size=4k", img, "4M");
        Qemu.io(dir, "qcow2", img, List.of("write -P 0x61 0 1M", "write -P 0x62 2M 64k"));
        if (!readOnly) {
            assertThat(FormatMatrixTest.cli("dedup", img).rc()).isZero(); // writes go through dedup
        }
        Path sock = dir.resolve("f.sock");
        Random r = new Random(WriterModelTest.SEED ^ (readOnly ? 1 : 2));
        try (BlockDevice dev = readOnly ? Images.open(img, OpenOptions.defaults()) : Images.openWritable(img, OpenOptions.defaults())) {
            ServerSocketChannel l = ServerSocketChannel.open(StandardProtocolFamily.UNIX);
            l.bind(UnixDomainSocketAddress.of(sock));
            NbdServer server = new NbdServer(dev, readOnly, "", 0, l);
            Thread serving = Thread.ofPlatform().start(() -> {
                try {
                    server.serve();
                } catch (Exception e) {
                    throw new RuntimeException(e);
                }
            });
            for (int i = 0; i < SESSIONS; i++) {
                session(sock, r, dev.size());
            }
            // a well-behaved client is still served
            Qemu.Result ok = Qemu.exec(dir, List.of("qemu-io", "-f", "raw", readOnly ? "-r" : "-n", "-c", "read 0 4k",
                    "nbd+unix:///?socket=" + sock));
            assertThat(ok.exit()).as("qemu-io after %d fuzzed sessions: %s%s", SESSIONS, ok.out(), ok.err()).isZero();
            server.close();
            serving.join(30_000);
            assertThat(serving.isAlive()).as("server stopped").isFalse();
        }
        FormatMatrixTest.assertClean(dir, img);
        if (readOnly) {
            Qemu.io(dir, "qcow2", img, List.of("read -P 0x61 0 1M", "read -P 0 1M 1M", "read -P 0x62 2M 64k"));
        }
    }

    private static void session(Path sock, Random r, long size) throws Exception {
        try (SocketChannel c = SocketChannel.open(StandardProtocolFamily.UNIX)) {
            c.connect(UnixDomainSocketAddress.of(sock));
            Thread drain = Thread.ofVirtual().start(() -> {
                ByteBuffer b = ByteBuffer.allocate(1 << 16);
                try {
                    while (c.read(b.clear()) >= 0) {
                        // replies are not checked here: the point is that the server survives
                    }
                } catch (Exception ignored) {
                    // closed
                }
            });
            ByteBuffer out = ByteBuffer.allocate(1 << 20);
            int mode = r.nextInt(4);
            if (mode == 0) {
                byte[] junk = new byte[r.nextInt(300)];
                r.nextBytes(junk);
                out.put(junk);
            } else {
                out.putInt(r.nextInt(8) == 0 ? r.nextInt() : r.nextInt(4)); // client flags
                int options = r.nextInt(5);
                for (int o = 0; o < options; o++) {
                    option(out, r);
                }
                // NBD_OPT_STRUCTURED_REPLY sometimes, then GO (or EXPORT_NAME), then requests
                if (r.nextBoolean()) {
                    out.putLong(0x49484156454F5054L).putInt(8).putInt(0);
                    out.putLong(0x49484156454F5054L).putInt(10).putInt(4 + 4 + 4 + 15).putInt(0).putInt(1).putInt(15)
                            .put("base:allocation".getBytes());
                }
                if (r.nextBoolean()) {
                    out.putLong(0x49484156454F5054L).putInt(7).putInt(6).putInt(0).putShort((short) 0);
                } else {
                    out.putLong(0x49484156454F5054L).putInt(1).putInt(0);
                }
                int requests = r.nextInt(20);
                for (int q = 0; q < requests && out.remaining() > 100_000; q++) {
                    request(out, r, size);
                }
            }
            out.flip();
            try {
                while (out.hasRemaining()) {
                    c.write(out);
                }
            } catch (Exception e) {
                // the server hung up on us
            }
            if (r.nextBoolean()) {
                Thread.sleep(r.nextInt(3));
            }
            c.shutdownOutput();
            drain.join(10_000);
            assertThat(drain.isAlive()).as("server answered or hung up within 10 s").isFalse();
        }
    }

    private static void option(ByteBuffer out, Random r) {
        out.putLong(r.nextInt(10) == 0 ? r.nextLong() : 0x49484156454F5054L);
        out.putInt(r.nextInt(12) == 0 ? r.nextInt() : r.nextInt(12));
        int len = r.nextInt(40);
        out.putInt(r.nextInt(10) == 0 ? r.nextInt(1 << 20) : len); // sometimes a length that lies
        byte[] data = new byte[len];
        r.nextBytes(data);
        if (len >= 4 && r.nextBoolean()) {
            data[0] = data[1] = data[2] = 0; // small name length
            data[3] = (byte) r.nextInt(8);
        }
        out.put(data);
    }

    private static void request(ByteBuffer out, Random r, long size) {
        out.putInt(r.nextInt(30) == 0 ? r.nextInt() : 0x25609513);
        out.putShort((short) (r.nextInt(4) == 0 ? r.nextInt(1 << 16) : r.nextInt(32)));
        int type = r.nextInt(10) == 0 ? r.nextInt(1 << 16) : r.nextInt(8);
        if (type == 2 && r.nextBoolean()) {
            type = 0; // fewer disconnects, more commands
        }
        out.putShort((short) type);
        out.putLong(r.nextLong());
        long off = switch (r.nextInt(4)) {
            case 0 -> r.nextLong();
            case 1 -> size - r.nextInt(8192);
            default -> r.nextInt((int) size);
        };
        out.putLong(off);
        int len = switch (r.nextInt(5)) {
            case 0 -> r.nextInt();
            case 1 -> 0;
            default -> r.nextInt(16384);
        };
        out.putInt(len);
        if (type == 1) {
            int send = len >= 0 && len <= 16384 && r.nextInt(5) != 0 ? len : r.nextInt(100); // sometimes cut short
            byte[] payload = new byte[send];
            if (r.nextBoolean()) {
                java.util.Arrays.fill(payload, (byte) 0x61); // duplicates of what is stored
            } else {
                r.nextBytes(payload);
            }
            out.put(payload);
        }
    }
}
