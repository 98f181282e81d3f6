// MtParent.java - the JVM parent of the mitosis end-to-end tests.
//
// usage: java -XX:-UsePerfData -cp DIR MtParent
//
// Before the prepare point it builds a HashMap of 200k entries, starts a
// fixed pool of 4 worker threads (and runs a job on each, so they exist), a
// consumer thread blocked in a BlockingQueue.take() (a condition-variable
// wait), and the JVM's own threads (GC, JIT compilers, signal dispatcher,
// finalizer...). Then it prints "READY <pid>" and stops itself with SIGSTOP:
// `mitosis prepare --pid` takes it there with every thread.
//
// After the prepare point (the parent on SIGCONT, every child) it prints
//   ROLE parent|child <pid>
//   CHECK pool ok        8 jobs on the pool return their sums
//   CHECK queue ok       the consumer answers through a second queue
//   CHECK gc ok          System.gc() returns and the map is intact
//   DIGEST <sha256 hex>  of the map and the jobs' results
//   DONE
// and exits 0. A watchdog thread bounds the run: a hang exits 3.
import java.nio.file.Files;
import java.nio.file.Paths;
import java.security.MessageDigest;
import java.util.HashMap;
import java.util.concurrent.*;

public class MtParent {
    static String pid() throws Exception {
        return Files.readSymbolicLink(Paths.get("/proc/self")).toString();
    }

    public static void main(String[] args) throws Exception {
        HashMap<Integer, String> m = new HashMap<>();
        for (int i = 0; i < 200000; i++) m.put(i, "v" + (i * 2654435761L % 4294967296L));
        ExecutorService pool = Executors.newFixedThreadPool(4);
        for (int i = 0; i < 4; i++) pool.submit(() -> 1).get();
        BlockingQueue<Integer> in = new LinkedBlockingQueue<>();
        BlockingQueue<Long> out = new LinkedBlockingQueue<>();
        Thread consumer = new Thread(() -> {
            try {
                while (true) {
                    int n = in.take();
                    long s = 0;
                    for (int i = 0; i < n; i++) s += m.get(i).length();
                    out.put(s);
                }
            } catch (InterruptedException e) {
                // ends with the process
            }
        }, "consumer");
        consumer.setDaemon(true);
        consumer.start();
        String before = pid();
        System.out.println("READY " + before);
        System.out.flush();
        // The kill comes from a shell that waits first: a kill that
        // arrived at once could stop this JVM inside start(), before it
        // closes its end of the pipe it watches the exec through (an fd
        // to another process, which prepare refuses).
        new ProcessBuilder("sh", "-c", "sleep 0.3; exec kill -STOP " + before).inheritIO().start();
        // Stopped here (the kill arrives within this sleep); parent and
        // children go on below.
        Thread.sleep(2000);

        Thread watchdog = new Thread(() -> {
            try {
                Thread.sleep(30000);
            } catch (InterruptedException e) {
                return;
            }
            System.out.println("ERROR watchdog");
            System.out.flush();
            Runtime.getRuntime().halt(3);
        }, "watchdog");
        watchdog.setDaemon(true);
        watchdog.start();
        String me = pid();
        System.out.println("ROLE " + (me.equals(before) ? "parent" : "child") + " " + me);

        long[] sums = new long[8];
        Future<?>[] fs = new Future<?>[8];
        for (int j = 0; j < 8; j++) {
            final int k = j;
            fs[j] = pool.submit(() -> {
                long s = 0;
                for (int i = k; i < 200000; i += 8) s += m.get(i).hashCode();
                sums[k] = s;
            });
        }
        for (Future<?> f : fs) f.get(10, TimeUnit.SECONDS);
        System.out.println("CHECK pool ok");

        in.put(100000);
        Long got = out.poll(10, TimeUnit.SECONDS);
        System.out.println(got != null && got > 0 ? "CHECK queue ok" : "CHECK queue FAIL no answer");

        System.gc();
        System.out.println(m.size() == 200000 ? "CHECK gc ok" : "CHECK gc FAIL size " + m.size());

        MessageDigest h = MessageDigest.getInstance("SHA-256");
        for (int i = 0; i < 200000; i++) h.update((i + "=" + m.get(i) + ";").getBytes());
        for (long s : sums) h.update(Long.toString(s).getBytes());
        StringBuilder hex = new StringBuilder();
        for (byte b : h.digest()) hex.append(String.format("%02x", b));
        System.out.println("DIGEST " + hex);
        System.out.println("DONE");
        System.out.flush();
        Runtime.getRuntime().halt(0);
    }
}
